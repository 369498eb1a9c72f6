"""The fedpir ClientApp: wires Flower messages to a :class:`fedpir.client.site.Site`.

Node config (``flower-supernode --node-config``), deployment:
    data-dir     the site's folder or manifest (required)
    state-dir    where local layers and the privacy ledger live (default: under the run folder)
    site-name    name reported to the server (default: the data folder's name)
Simulation: ``partition-id`` picks ``site-<id>`` of the run's (synthetic) federation.
"""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedpir.client.site import Site, site_state_dir
from fedpir.run_config import RunSettings
from fedpir.strategies import has_modality_key

_SITES: dict[tuple, Site] = {}


def site_for(context: Context, settings: RunSettings | None = None) -> Site:
    """The site this node serves (built once per process, data folder and run settings)."""
    settings = settings or RunSettings.from_run_config(dict(context.run_config))
    node = dict(context.node_config)
    if "data-dir" in node:
        data_dir = Path(str(node["data-dir"])).expanduser()
        name = str(node.get("site-name", data_dir.name))
    elif "partition-id" in node:
        name = f"site-{int(node['partition-id'])}"
        data_dir = settings.federation_path / name
    else:
        raise ValueError("node config needs 'data-dir' (deployment) or 'partition-id' (simulation)")
    key = (settings, str(data_dir), name)
    if key not in _SITES:
        _SITES[key] = Site(settings, data_dir, site_state_dir(settings, name, node.get("state-dir")), name)
    return _SITES[key]


def _reply(msg: Message, site: Site, metrics: dict[str, float], n: int, arrays: ArrayRecord | None) -> Message:
    flags = {has_modality_key(m): float(m in site.modalities) for m in site.settings.vocabulary}
    content = RecordDict({
        "metrics": MetricRecord({**metrics, **flags, "num-examples": n}),
        "site": ConfigRecord({"name": site.name}),
    })
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


def make_client_app(settings: RunSettings | None = None, mods: list[Mod] | None = None) -> ClientApp:
    """A ClientApp; ``settings`` fixes the run settings (else they come from Flower's run config)."""
    app = ClientApp(mods=mods or [])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        """Load the global shared weights, train locally under DP, reply with the shared weights only."""
        site = site_for(context, settings)
        config = msg.content["config"]
        site.load_global(msg.content["arrays"].to_torch_state_dict())
        metrics = site.train(str(config["stage"]), epochs=int(config.get("local-epochs", site.settings.local_epochs)))
        return _reply(msg, site, metrics, len(site.train_set), ArrayRecord(site.sent_state()))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Evaluate the global weights (with this site's local layers) on its held-out patients."""
        site = site_for(context, settings)
        site.load_global(msg.content["arrays"].to_torch_state_dict())
        with torch.no_grad():
            metrics = site.evaluate(str(msg.content["config"]["stage"]))
        return _reply(msg, site, metrics, len(site.holdout_set), None)

    return app


app = make_client_app()
