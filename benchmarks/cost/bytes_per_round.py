"""Bytes a site sends per round under each key policy (fedpir and the baselines), as JSON.

    python benchmarks/cost/bytes_per_round.py [--size 24] [--modalities t1,t2,flair,pd]

Serializes the reply's ArrayRecord exactly as Flower does (``Array`` payloads) and counts bytes.
"""

from __future__ import annotations

import argparse
import json

from flwr.app import ArrayRecord

from fedpir.models.groups import KEY_POLICIES
from fedpir.run_config import RunSettings
from fedpir.training.model import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=RunSettings().volume_size)
    parser.add_argument("--modalities", default=RunSettings().modalities)
    args = parser.parse_args()
    model = build_model(RunSettings(volume_size=args.size, modalities=args.modalities))
    state = model.state_dict()
    rows = {}
    for policy in KEY_POLICIES:
        keys = model.federated_keys(policy)
        record = ArrayRecord({k: state[k] for k in keys}) if keys else ArrayRecord()
        payload = sum(len(array.data) for array in record.values())
        rows[policy] = {"tensors": len(keys), "parameters": int(sum(state[k].numel() for k in keys)),
                        "payload_bytes": payload}
    print(json.dumps({"size": args.size, "modalities": args.modalities, "total_tensors": len(state),
                      "policies": rows}, indent=1))


if __name__ == "__main__":
    main()
