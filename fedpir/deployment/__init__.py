"""Deployment on Flower's deployment engine: provisioning (CA, TLS, node keys), the command lines of
the SuperLink and SuperNodes, app approval at a hospital and a hospital's status report."""
