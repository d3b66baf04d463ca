"""The hospital site on Flower: turn a message into ``SiteRuntime`` calls and back.

A site's node config names its data (``data-path``), its name (``site-name``), where it keeps its
caches (``state-dir``), optionally its own copy of the pretrained checkpoint (``weights``: the only
checkpoint file it opens) and whether its manifest may name images outside its folder
(``allow-outside-paths``). In a
simulation, nodes only know their ``partition-id``; the run config's ``sites-dir`` then holds one
folder per partition, as ``fedfreeze simulate`` writes it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedfreeze.errors import ConfigError, ProtocolError
from fedfreeze.federation.protocol import (
    ARRAYS,
    BASE,
    CONFIG,
    METRICS,
    OPERATING_POINT,
    PROOF,
    SECURE_SUM,
    SITE_FIGURES,
    RoundOrders,
)
from fedfreeze.federation.secure_stats import SECURE
from fedfreeze.federation.site_runtime import SiteReply, SiteRuntime
from fedfreeze.flower import secagg_site
from fedfreeze.flower.secagg import SETUP_TYPE, SHARE_KEYS_TYPE, UNMASK_TYPE

log = logging.getLogger("flwr")  # Flower's handler prints it in the SuperNode's log


def runtime_for(context: Context) -> SiteRuntime:
    """The site this ClientApp serves, from its node config (or its simulation partition)."""
    node = context.node_config
    # a simulated node's data and checkpoint are the job's own (one person runs both); a deployed
    # site's manifest stays in its folder and it opens no checkpoint the job names, unless it says so
    simulated = "data-path" not in node
    if "data-path" in node:
        data = Path(str(node["data-path"]))
        site = str(node.get("site-name", data.name))
        state = Path(str(node.get("state-dir", Path.home() / ".cache" / "fedfreeze" / site)))
    elif "partition-id" in node and context.run_config.get("sites-dir"):
        sites_dir = Path(str(context.run_config["sites-dir"]))
        folder = f"site-{int(node['partition-id'])}"
        data, state = sites_dir / folder / "data", sites_dir / folder / "state"
        site = site_names(sites_dir).get(folder, folder)
    elif "partition-id" in node:
        # `flwr run .` with no sites-dir: each simulated node takes its share of the shipped data
        site = f"sample-site-{int(node['partition-id'])}"
        state = Path.home() / ".cache" / "fedfreeze" / "simulation" / site
        data = sample_partition(int(node["partition-id"]), int(node.get("num-partitions", 1)), state / "data")
    else:
        raise ConfigError(
            'this site has no data: start the SuperNode with --node-config \'data-path="/path" site-name="name"\' '
            "(or run a simulation whose run config sets sites-dir)"
        )
    weights = node.get("weights")
    if "threads" in node:
        torch.set_num_threads(int(node["threads"]))
    memory = node.get("max-train-memory-mb")
    if memory is not None and (isinstance(memory, bool) or not isinstance(memory, (int, float)) or memory <= 0):
        raise ConfigError(f"node config max-train-memory-mb: expected a positive number of MB, got {memory!r}")
    return SiteRuntime(
        data,
        site,
        state,
        weights=str(weights) if weights else None,
        device=str(node.get("device", "auto")),
        max_train_memory_mb=float(memory) if memory is not None else None,
        outside_paths=simulated or bool(node.get("allow-outside-paths", False)),
        job_weights=simulated,
        share_operating_point=site_choice(context, "share-operating-point", "share-operating-points"),
        share_site_figures=site_choice(context, "share-site-figures", "share-site-figures"),
    )


def site_choice(context: Context, key: str, simulation_key: str) -> bool:
    """A site's own choice of what it shares (node config ``key``: ``share-operating-point``,
    ``share-site-figures``); in a simulation, where whoever runs it holds every site, the run config's
    ``simulation_key`` (``fedfreeze simulate``'s option)."""
    node = context.node_config
    value = node.get(key)
    if value is None and "partition-id" in node:
        value = context.run_config.get(simulation_key, False)
    if isinstance(value, str):
        if value.lower() not in ("true", "false"):
            raise ConfigError(f"node config {key}: expected true or false, got {value!r}")
        return value.lower() == "true"
    return bool(value)


def site_names(sites_dir: Path) -> dict[str, str]:
    """Folder -> site name, from the ``sites.json`` that ``fedfreeze simulate`` writes."""
    import json

    from fedfreeze.data.partition import SITES_FILE

    path = sites_dir / SITES_FILE
    if not path.is_file():
        return {}
    return {str(s["site"]): str(s["name"]) for s in json.loads(path.read_text())}


def sample_partition(partition: int, partitions: int, folder: Path) -> Path:
    """One simulated site's share of the shipped Kermany subset, by patient (its site column when
    there are as many partitions as sites there, else an IID split)."""
    import csv
    import io

    import numpy as np

    from fedfreeze.data.partition import assign_sites
    from fedfreeze.sample_data import kermany_mini

    manifest = kermany_mini("train")
    rows = list(csv.DictReader(manifest.open()))
    names = sorted({r["site"] for r in rows})
    if partitions == len(names):
        index = [names.index(r["site"]) for r in rows]
    else:
        index = assign_sites(
            np.array([int(r["label"]) for r in rows]), [r["patient_id"] for r in rows], partitions, alpha=None, seed=0
        ).tolist()
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "patient_id"])
    for row, site in zip(rows, index, strict=True):
        if site == partition:
            writer.writerow([str((manifest.parent / row["path"]).resolve()), row["label"], row["patient_id"]])
    text = buffer.getvalue()
    target = folder / "manifest.csv"
    if not target.is_file() or target.read_text() != text:  # unchanged: keep its date, and the site's caches
        folder.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return folder


def orders_from(config: ConfigRecord) -> RoundOrders:
    return RoundOrders.from_config(dict(config))


def to_reply(message: Message, result: SiteReply, site: str, *, with_arrays: bool) -> Message:
    metrics: dict[str, Any] = {k: v for k, v in result.metrics.items()}
    if "num-examples" not in metrics:
        metrics["num-examples"] = int(metrics.get("val-n", 0))
    proof: dict[str, Any] = {"frozen-hash": result.frozen_hash, "site": site, "role": result.role}
    if result.operating_point is not None:  # final evaluation, and only when the site shares it
        proof[OPERATING_POINT] = result.operating_point.model_dump_json(by_alias=True)
    content = RecordDict({METRICS: MetricRecord(metrics), PROOF: ConfigRecord(proof)})
    if result.own_figures:  # only when the site shares them
        content[SITE_FIGURES] = ConfigRecord(dict(result.own_figures))
    if with_arrays:
        content[ARRAYS] = ArrayRecord(result.arrays)
    return Message(content=content, reply_to=message)


def received_arrays(message: Message) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The round's trainable arrays, and the frozen ``base`` arrays when the coordinator sent them
    (merged rounds of ``train.recipe = "dual"``: they load into the model, the reply never holds them)."""
    records = message.content.array_records
    arrays = records[ARRAYS].to_torch_state_dict()
    if BASE in records:
        return arrays, records[BASE].to_torch_state_dict()
    return arrays, {}


def dp_clipping_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``fixedclipping_mod`` when the coordinator runs client-side DP, else a pass-through.

    The DP wrapper on the coordinator puts the clipping norm in the round's config; the mod clips
    this site's update (reply minus received arrays) to that L2 norm before it leaves the site.
    """
    config = message.content.config_records.get(CONFIG)
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(message, context)
    return fixedclipping_mod(message, context, call_next)


def logged_failures(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Write a site's failure to its own log in one clear line, then let Flower turn it into an
    error reply (the coordinator records the reason; the site's process does not linger)."""

    @functools.wraps(handler)
    def run(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except Exception as err:
            site = context.node_config.get("site-name", f"node {context.node_id}")
            log.error("site %s cannot take part in this round: %s: %s", site, type(err).__name__, err)
            raise

    return run


def secure_part(message: Message, orders: RoundOrders) -> ConfigRecord | None:
    """This site's part of secure aggregation in a round message, when the coordinator put its
    statistics into a secure sum (None: it releases cells). Under secure aggregation every round message
    says which, so a site never guesses."""
    part = message.content.config_records.get(SECURE_SUM)
    if orders.secure_aggregation and part is None:
        raise ProtocolError("the orders ask for secure aggregation, but the message says nothing of this site's part")
    return part if part is not None and part.get("release") == SECURE else None


def with_masked(reply: Message, part: ConfigRecord | None, result: SiteReply, context: Context) -> Message:
    """Add the masked statistics to a reply whose site is in a secure sum (the exact ones never travel)."""
    if part is not None:
        if result.secure_vector is None:
            raise ProtocolError("ordered into the secure sum, but the site computed no statistics to mask")
        reply.content[SECURE_SUM] = secagg_site.mask(part, context, result.secure_vector)
    return reply


@logged_failures
def handle_train(message: Message, context: Context) -> Message:
    runtime = runtime_for(context)
    orders = orders_from(message.content.config_records[CONFIG])
    part = secure_part(message, orders)
    result = runtime.train(orders, *received_arrays(message), secure=part is not None)
    result.metrics["process-seconds"] = process_seconds()
    if orders.dp_weight:  # DP accounting needs equal weights: every site counts once
        result.metrics["dp-weight"] = 1
    return with_masked(to_reply(message, result, runtime.site, with_arrays=True), part, result, context)


@logged_failures
def handle_evaluate(message: Message, context: Context) -> Message:
    runtime = runtime_for(context)
    orders = orders_from(message.content.config_records[CONFIG])
    part = secure_part(message, orders)
    result = runtime.evaluate(orders, *received_arrays(message), final=True, secure=part is not None)
    if result.note:
        log.info("%s", result.note)
    result.metrics["process-seconds"] = process_seconds()
    return with_masked(to_reply(message, result, runtime.site, with_arrays=False), part, result, context)


@logged_failures
def handle_secagg_setup(message: Message, context: Context) -> Message:
    part = secagg_site.setup(
        message.content.config_records[SECURE_SUM], context, message.metadata.dst_node_id, runtime_for(context).site
    )
    return Message(RecordDict({SECURE_SUM: part}), reply_to=message)


@logged_failures
def handle_secagg_share_keys(message: Message, context: Context) -> Message:
    part = secagg_site.share_keys(message.content.config_records[SECURE_SUM], context)
    return Message(RecordDict({SECURE_SUM: part}), reply_to=message)


@logged_failures
def handle_secagg_unmask(message: Message, context: Context) -> Message:
    part = secagg_site.unmask(message.content.config_records[SECURE_SUM], context)
    return Message(RecordDict({SECURE_SUM: part}), reply_to=message)


def client_app() -> ClientApp:
    """The site's ClientApp: the train handler behind Flower's client-side DP clipping mod (a
    pass-through unless the coordinator asks for it), the evaluate handler, and secure aggregation's
    own stages as ``query`` actions. ``client/app.py`` (what ``flwr run .`` deploys) and the in-process
    federation both use this one definition."""
    app = ClientApp()
    app.train(mods=[dp_clipping_mod])(handle_train)
    app.evaluate()(handle_evaluate)
    # secure aggregation's own stages (flower/secagg.py); the mask stage rides on train and evaluate
    app.query(SETUP_TYPE.split(".")[1])(handle_secagg_setup)
    app.query(SHARE_KEYS_TYPE.split(".")[1])(handle_secagg_share_keys)
    app.query(UNMASK_TYPE.split(".")[1])(handle_secagg_unmask)
    return app


def process_seconds() -> float:
    """Seconds since this process started (in a deployment: since Flower started it for this
    message), so the coordinator can tell its own overhead from the site's start-up. -1 off Linux."""
    import os
    import time

    try:
        with open("/proc/self/stat") as handle:
            started_ticks = int(handle.read().rsplit(") ", 1)[1].split()[19])
        with open("/proc/stat") as handle:
            boot = next(int(line.split()[1]) for line in handle if line.startswith("btime"))
        return time.time() - (boot + started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, StopIteration):
        return -1.0
