"""The fedpir ClientApp: wires Flower messages to a :class:`fedpir.client.site.Site`.

Node config (``flower-supernode --node-config``), deployment:
    data-dir     the site's folder or manifest (required)
    state-dir    where local layers and the privacy ledger live (required with data-dir)
    state-key-file / state-key-env  the key that encrypts the state at rest (fedpir.privacy.at_rest)
    data-roots   folders outside data-dir the manifest may point into (fedpir.data.confinement)
    site-name    name reported to the server (default: the data folder's name)
    approved-apps  the hospital's allow-list of FAB hashes (fedpir.deployment.approval; deploy/README.md)
    privacy-policy the hospital's privacy policy file (fedpir.privacy.policy; default: DEFAULT_POLICY;
                   the simulation engine's synthetic sites: RESEARCH_POLICY)
Every request is checked against the site's policy before it touches the model, only the metrics
the policy releases leave (fedpir.privacy.release), and a refused or failed request is answered
with an error code and a generic reason (fedpir.client.guard). Besides train and evaluate, the
alignment stage's two query messages (fedpir.wire.protocol, fedpir.client.alignment).
Simulation (Flower's simulation engine sets ``partition-id``): the node serves ``site-<id>`` of the
run's federation folder; without a configured ``federation-dir`` the simulation side
(:func:`fedpir.synthetic.prepare.synthetic_federation`) writes the synthetic federation of the
run's settings first. A deployed SuperNode never takes that path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from fedpir.alignment.records import map_from_records
from fedpir.client.alignment import statistics_reply, zero_shot_metrics
from fedpir.client.guard import admit_alignment, admit_evaluation, admit_training, answered
from fedpir.client.retry import LastReply, request_digest
from fedpir.client.secure_mod import secure_aggregation_mod, under_secure_aggregation
from fedpir.client.site import Site, site_state_dir
from fedpir.deployment.approval import require_guard_mod
from fedpir.privacy.budget import PrivacyLedger
from fedpir.privacy.policy import PolicyViolation, SitePolicy, check_request, policy_of_node, site_settings
from fedpir.privacy.release import release
from fedpir.privacy.secure_aggregation import key_order
from fedpir.run_config import RunSettings
from fedpir.wire.protocol import (
    ALIGN_STATISTICS,
    ALIGN_ZEROSHOT,
    ALIGNMENT_RECORD,
    EPOCHS_KEY,
    MAP_RECORD,
    NUM_EXAMPLES_KEY,
    PROXIMAL_MU_KEY,
    ROUND_KEY,
    STAGE_KEY,
    has_modality_key,
)
from fedpir.wire.transfer import encode_reply

_SITES: dict[tuple, Site] = {}


def run_settings(context: Context, settings: RunSettings | None = None) -> RunSettings:
    """The run's settings (given, else Flower's run config) with the run folder resolved."""
    settings = settings or RunSettings.from_run_config(dict(context.run_config))
    return settings.with_run_folder(context.run_id)


def _threads_of_reserved_cpus() -> None:
    """A simulated site uses as many torch threads as the CPUs its Ray worker reserved (Ray sets
    OMP_NUM_THREADS to them only when the driver's environment has no such variable)."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU") if ray.is_initialized() else None
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))


def site_for(context: Context, settings: RunSettings | None = None) -> Site:
    """The site this node serves (built once per process, data folder and run settings, and again when
    its ledger on disk moved on)."""
    settings = run_settings(context, settings)
    node = dict(context.node_config)
    if "data-dir" in node:
        if not node.get("state-dir"):  # else the ledger would live in the server's run folder: a new budget per run
            raise ValueError("node config needs 'state-dir' next to 'data-dir': the site's privacy ledger must "
                             "outlive every run")
        data_dir = Path(str(node["data-dir"])).expanduser()
        name = str(node.get("site-name", data_dir.name))
    elif "partition-id" in node:
        name = f"site-{int(node['partition-id'])}"
        _threads_of_reserved_cpus()
        if not settings.federation_dir:
            from fedpir.synthetic.prepare import synthetic_federation  # simulation engine only

            synthetic_federation(settings)
        data_dir = settings.federation_path / name
    else:
        raise ValueError("node config needs 'data-dir' (deployment) or 'partition-id' (simulation)")
    key = (settings, str(data_dir), name)
    state_dir = site_state_dir(settings, name, node.get("state-dir"))
    cached = _SITES.get(key)
    # Another process of this node (Flower's simulation spreads a node's messages over its workers) may
    # have trained since: then this process' copy is behind the (verified) ledger on disk and is rebuilt.
    if cached is None or PrivacyLedger.in_dir(state_dir, key_path=cached.trainer.ledger.key_path,
                                              cipher=cached.cipher).extends(cached.trainer.ledger):
        _SITES[key] = Site.for_node(settings, data_dir, state_dir, name, node)
    return _SITES[key]


def _released(msg: Message, site: Site, policy: SitePolicy, metrics: dict[str, float], n: int,
              patients: float | None = None) -> dict[str, float]:
    """The metrics the policy releases (computed over ``n`` examples; ``patients``: the ``n`` of their
    sensitivity to one patient, ``n`` if not given) and the modality flags."""
    flags = {has_modality_key(m): float(m in site.modalities) for m in site.settings.vocabulary}
    return release({**metrics, **flags, NUM_EXAMPLES_KEY: n}, policy, n_patients=n if patients is None else patients,
                   budget=site.trainer.budget, message=msg.metadata.message_type)


def _reply(msg: Message, site: Site, released: dict[str, float], arrays: ArrayRecord | None,
           **records: ArrayRecord | ConfigRecord) -> Message:
    """The reply: the ``released`` metrics, the site's name, ``arrays`` and any other ``records`` by name."""
    content = RecordDict({"metrics": MetricRecord(released), "site": ConfigRecord({"name": site.name})})
    if arrays is not None:
        content["arrays"] = arrays
    for name, record in records.items():
        content[name] = record
    return Message(content=content, reply_to=msg)


def _secure_reply(msg: Message, site: Site, released: dict[str, float], n: int,
                  update: dict[str, torch.Tensor]) -> Message:
    """The reply SecAgg+ masks: Flower's legacy FitRes layout with the update in
    :func:`~fedpir.privacy.secure_aggregation.key_order`, weighted by the released ``num-examples``."""
    ndarrays = [update[k].detach().cpu().numpy().astype(np.float32) for k in key_order(update)]
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(ndarrays), int(released.get(NUM_EXAMPLES_KEY, n)),
                    released)
    content = compat.fitres_to_recorddict(fitres, keep_input=False)
    content["site"] = ConfigRecord({"name": site.name})
    return Message(content=content, reply_to=msg)


def _train_request(msg: Message, site: Site) -> tuple[ConfigRecord, dict[str, torch.Tensor], bool]:
    """The config and global weights of a train request, and whether it came through SecAgg+
    (Flower's legacy FitIns layout, weights in key order). A secure-aggregation run's site
    answers no plain train request: its update would leave unmasked."""
    secure = under_secure_aggregation(msg)
    if site.settings.secure_aggregation and not secure:
        raise PolicyViolation("secure-aggregation", "a plain train request in a secure-aggregation run")
    if not secure:
        return msg.content["config"], msg.content["arrays"].to_torch_state_dict(), False
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    arrays = parameters_to_ndarrays(fitins.parameters)
    keys = key_order(site.sent_keys)
    if len(arrays) != len(keys):
        raise ValueError(f"secure train request holds {len(arrays)} arrays, the key policy {len(keys)}")
    return ConfigRecord(dict(fitins.config)), {k: torch.from_numpy(a.copy()) for k, a in zip(keys, arrays)}, True


def admitted_site(context: Context, settings: RunSettings | None) -> tuple[Site, SitePolicy]:
    """The site of this node and its privacy policy, once the run's settings passed the policy; the
    site runs them as its policy says (its own noise share: :func:`~fedpir.privacy.policy.site_settings`)."""
    policy = policy_of_node(dict(context.node_config))
    asked = run_settings(context, settings)
    check_request(policy, asked)  # before the site is built
    return site_for(context, site_settings(policy, asked)), policy


def site_with_global(msg: Message, context: Context, settings: RunSettings | None,
                     admit: Callable[[SitePolicy, Site], None]) -> tuple[Site, SitePolicy]:
    """The admitted site and its policy, once ``admit`` let the request through, with the message's
    global weights loaded (the prologue of every handler but train's)."""
    site, policy = admitted_site(context, settings)
    admit(policy, site)
    site.load_global(msg.content["arrays"].to_torch_state_dict())
    return site, policy


def make_client_app(settings: RunSettings | None = None, mods: list[Mod] | None = None,
                    inner_mods: list[Mod] | None = None) -> ClientApp:
    """A ClientApp; ``settings`` fixes the run settings (else they come from Flower's run config).
    ``mods`` run before secure aggregation (they see masked updates), ``inner_mods`` after it (they
    see the plain reply of the train handler)."""
    secure = secure_aggregation_mod(lambda context: run_settings(context, settings))
    app = ClientApp(mods=[*(mods or []), secure, *(inner_mods or [])])

    @app.train()
    @answered
    def train(msg: Message, context: Context) -> Message:
        """Load the global shared weights, train locally under DP, reply with the shared weights only
        (a repeated request gets the reply already released, and nothing trains: fedpir.client.retry)."""
        site, site_policy = admitted_site(context, settings)
        config, received, secure = _train_request(msg, site)
        epochs = int(config.get(EPOCHS_KEY, site.settings.local_epochs))
        stage, n = str(config[STAGE_KEY]), len(site.train_set)
        asked = (settings or RunSettings.from_run_config(dict(context.run_config))).to_run_config()
        digest = request_digest(asked, stage, int(config.get(ROUND_KEY, 0)), epochs, received)
        last = LastReply(site.state_dir, site.cipher)
        replayed = last.replay(digest)
        if replayed is None:
            admit_training(site_policy, site, epochs)
            site.load_global(received)
            metrics = site.train(stage, epochs=epochs, proximal_mu=float(config.get(PROXIMAL_MU_KEY, 0.0)))
            weights, released = site.sent_state(), _released(msg, site, site_policy, metrics, n)
            last.remember(digest, weights, released)
        else:
            weights, released = replayed
        if secure:
            return _secure_reply(msg, site, released, n, {k: v - received[k] for k, v in weights.items()})
        return _reply(msg, site, released, encode_reply(weights, received, site.settings.transfer_dtype))

    @app.evaluate()
    @answered
    def evaluate(msg: Message, context: Context) -> Message:
        """Evaluate the global weights (with this site's local layers) on its held-out patients."""
        site, site_policy = site_with_global(msg, context, settings, admit_evaluation)
        with torch.no_grad():
            metrics = site.evaluate(str(msg.content["config"][STAGE_KEY]))
        released = _released(msg, site, site_policy, metrics, len(site.holdout_set), site.holdout_patients)
        return _reply(msg, site, released, None)

    @app.query(ALIGN_STATISTICS.split(".")[1])
    @answered
    def alignment_statistics(msg: Message, context: Context) -> Message:
        """With the global weights, the sufficient statistics of the site's anchors (if its policy lets them leave)."""
        site, site_policy = site_with_global(msg, context, settings, admit_alignment)
        statistics, described, n = statistics_reply(site, msg.metadata.message_type)
        return _reply(msg, site, _released(msg, site, site_policy, {}, n), statistics, **{ALIGNMENT_RECORD: described})

    @app.query(ALIGN_ZEROSHOT.split(".")[1])
    @answered
    def zeroshot(msg: Message, context: Context) -> Message:
        """With the global weights and the map T, zero-shot metrics on the site's held-out patients."""
        site, site_policy = site_with_global(msg, context, settings, admit_evaluation)
        amap = map_from_records(msg.content.array_records[MAP_RECORD], msg.content.config_records[ALIGNMENT_RECORD])
        metrics, n, patients = zero_shot_metrics(site, amap)
        return _reply(msg, site, _released(msg, site, site_policy, metrics, n, patients), None)

    return app


app = make_client_app(mods=[require_guard_mod])  # deployment: refuse if approved-apps is set but unguarded
