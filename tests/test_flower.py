"""The Flower adapter for real: a simulation and a loopback deployment, each against an in-process run.

Tolerance: the Flower runs must end with the in-process run's global adapter within ATOL = 1e-6 (absolute, per
element). Both sides run the same float32 kernels with one thread per process, in the same client order; the wire is
float32, lossless for this float32 model; the server aggregates in float64 as the in-process trainer does. So the
adapters are expected to be bitwise equal (measured: max |diff| = 0.0); the 1e-6 absorbs kernel differences between
processes while staying far below what a round changes (asserted > 1e-4), so a wrong client state, weight or order
still fails. Metrics other than timings and byte counts (NumPy vs safetensors framing) must match to 1e-6 relative.

Runtime measured on 2 CPU cores shared with other jobs: 72 s for the simulation (two Ray start-ups), 80 s for the
deployment (a fresh ``flwr-clientapp`` process per message, each importing torch and the project).
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import IO

import pytest
import torch

from fedrl_lightning import checkpoint
from fedrl_lightning.aggregation import ClientUpdate
from fedrl_lightning.cli import FedRLCLI
from fedrl_lightning.client_state import ClientState

# No usage telemetry from tests; flwr reads this once, when it is first imported (here, or by a child process).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
HAS_FLWR = importlib.util.find_spec("flwr") is not None
pytestmark = [pytest.mark.flower, pytest.mark.skipif(not HAS_FLWR, reason="Flower is not installed (.[flower])")]
if HAS_FLWR:
    from flwr.app import ArrayRecord

    from fedrl_lightning.flower import records
    from fedrl_lightning.flower.settings import FlowerSettings, resolve_config
    from fedrl_lightning.flower.state import ClientStateStore

ATOL = 1e-6
CHANGED = 1e-4  # a round must move the adapter by more than this, or the comparison proves nothing
ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
APP = ROOT / "examples" / "flower"  # the Flower app project (pyproject.toml with the components)
BIN = Path(sys.executable).parent
# Rewards that vary within a group for a random model (tiny.yaml's accuracy reward is always 0: nothing would train).
MODEL = """
model:
  init_args:
    learning_rate: 1e-2
    reward_funcs: [conftest.length_reward]
    reward_weights: [1.0]
"""
SCAFFOLD_FGRPO = """
trainer:
  aggregation:
    class_path: fedrl_lightning.aggregation.RelativeGainWeighting
    init_args:
      aggregator:
        class_path: fedrl_lightning.aggregation.Scaffold
  eval_before_training: false
"""
FEDADAM_SERVER_FGRPO = """
trainer:
  num_rounds: 1
  aggregation:
    class_path: fedrl_lightning.aggregation.RelativeGainWeighting
    init_args:
      aggregator:
        class_path: fedrl_lightning.aggregation.FedAdam
      baseline_on_client: false
  eval_before_training: false
"""


# -- helpers ----------------------------------------------------------------------------------------------------


@pytest.fixture
def flower_env(monkeypatch):
    """One thread here and in every process started from here, so kernels reduce in the same order everywhere."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # Ray workers and Flower's app processes import ``conftest.length_reward`` from the YAML.
    paths = [str(ROOT / "tests"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_fragment(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fragment.yaml"
    path.write_text(MODEL + text)
    return path


def cli_args(fragment: Path, out: Path) -> list[str]:
    return ["-c", str(TINY), "-c", str(fragment), "--trainer.output_dir", str(out), "--trainer.progress", "false"]


def server_state(out: Path) -> dict:
    """The server's state in a run's newest checkpoint."""
    return checkpoint.load(checkpoint.latest_valid(out / "checkpoints"))["server"]


def in_process_run(fragment: Path, out: Path) -> dict:
    """The reference: ``fedrl fit`` in this process; returns its last checkpoint's server state."""
    FedRLCLI(args=["fit", *cli_args(fragment, out)])
    return server_state(out)


def initial_adapter(fragment: Path, out: Path) -> dict[str, torch.Tensor]:
    return FedRLCLI(args=cli_args(fragment, out), run=False).model.trainable_state()


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def assert_same_run(flower: dict, reference: dict, initial: dict[str, torch.Tensor]) -> float:
    """Same round, same adapter (within ATOL, and it did train), same metrics; returns the max difference."""
    assert flower["round"] == reference["round"]
    diff = max_diff(flower["global_state"], reference["global_state"])
    assert diff <= ATOL, f"Flower and in-process adapters differ by {diff}"
    assert max_diff(reference["global_state"], initial) > CHANGED, "the rounds did not change the adapter"
    rows = {row["round"]: row for row in flower["history"]}
    for ref_row in reference["history"]:
        row = rows[ref_row["round"]]
        for key, value in ref_row.items():
            if "timing/" in key or key.startswith("comm/"):
                continue
            assert key in row, f"round {ref_row['round']}: {key} missing from the Flower run's metrics"
            same = math.isclose(row[key], value, rel_tol=1e-6, abs_tol=1e-9) or (
                math.isnan(row[key]) and math.isnan(value)
            )
            assert same, f"round {ref_row['round']}: {key} = {row[key]} on Flower, {value} in process"
    return diff


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- pieces, no Flower run ---------------------------------------------------------------------------------------


def test_records_cast_half_precision_to_float32_on_the_wire_and_back():
    bf16 = {"a": torch.randn(3, 4).to(torch.bfloat16), "b": torch.randn(2).to(torch.bfloat16)}
    record = records.to_record(bf16)
    assert all(array.dtype == "float32" for array in record.values())
    back = records.from_record(record, like=bf16)
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], bf16[k]) for k in bf16)
    with pytest.raises(KeyError, match="missing"):
        records.from_record(ArrayRecord({"a": torch.zeros(3, 4)}), like=bf16)

    state = {"w": torch.randn(2, 2)}
    update = ClientUpdate(
        3, state, 4, 17, {"reward": 0.5}, extra={"task": "gcd", "accuracy": 0.25, "c": {"w": state["w"]}}
    )
    got = records.content_to_update(records.update_to_content(update), like=state)
    assert (got.client_id, got.num_samples, got.num_tokens, got.metrics) == (3, 4, 17, {"reward": 0.5})
    assert got.extra["task"] == "gcd" and got.extra["accuracy"] == 0.25 and torch.equal(got.extra["c"]["w"], state["w"])
    assert torch.equal(got.state["w"], state["w"])
    bad = replace(update, state={"w": torch.tensor([[math.nan, 0.0], [0.0, 0.0]])}, extra={})
    with pytest.raises(ValueError, match="non-finite"):
        records.content_to_update(records.update_to_content(bad), like=state)


def test_settings_name_unknown_keys_and_find_configs_in_the_checkout(tmp_path):
    with pytest.raises(ValueError, match="num-server-roundz"):
        FlowerSettings.from_run_config({"num-server-roundz": 3})
    settings = FlowerSettings.from_run_config(
        {"config": "configs/tiny.yaml", "overrides": "--trainer.num_rounds 5"}, defaults={"ckpt-path": "none"}
    )
    assert settings.ckpt_path is None and settings.overrides == ("--trainer.num_rounds", "5")
    assert settings.cli_args() == ["-c", str(TINY), "--trainer.num_rounds", "5"]
    assert resolve_config(str(TINY)) == TINY
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        resolve_config(str(tmp_path / "nope.yaml"))


def test_client_state_store_starts_a_round_from_the_state_saved_before_it(tmp_path):
    store = ClientStateStore(tmp_path, client_id=1, keep=2)
    assert store.load(before_round=1) is None  # never trained: the caller starts fresh
    for r in (1, 2, 3):
        store.save(r, ClientState(sampler={"cursor": r}, rng=torch.get_rng_state(), extra={"round": r}))
    assert store.rounds() == [2, 3]  # keep=2
    assert store.load(before_round=4).extra == {"round": 3}
    assert store.load(before_round=3).extra == {"round": 2}  # a retried or repeated round 3
    (store.directory / "round-000003" / "manifest.json").unlink()  # torn
    assert store.load(before_round=4).extra == {"round": 2}
    with pytest.raises(FileNotFoundError, match="no valid state before round 2"):
        store.load(before_round=2)  # pruned: starting fresh would silently change the run


# -- every aggregator through the Flower apps ----------------------------------------------------------------------

AGGREGATORS = {
    "FedAvg": "fedrl_lightning.aggregation.FedAvg",
    "FedAvgM": "fedrl_lightning.aggregation.FedAvgM",
    "FedProx": "fedrl_lightning.aggregation.FedProx\n    init_args: {mu: 0.1}",
    "Scaffold": "fedrl_lightning.aggregation.Scaffold",
    "FedAdam": "fedrl_lightning.aggregation.FedAdam",
    "FedYogi": "fedrl_lightning.aggregation.FedYogi",
    "FedAdagrad": "fedrl_lightning.aggregation.FedAdagrad",
    "FedMedian": "fedrl_lightning.aggregation.FedMedian",
    "TrimmedMean": "fedrl_lightning.aggregation.TrimmedMean\n    init_args: {beta: 0.34}",
    "Krum": "fedrl_lightning.aggregation.Krum",
    "TaskAwareFedAvg": "fedrl_lightning.aggregation.TaskAwareFedAvg",
    "DPFedAvg": "fedrl_lightning.privacy.DPFedAvg\n"
    "    init_args: {num_clients: 3, noise_multiplier: 0.5, clip_norm: 0.05}",
    "FGRPO": "fedrl_lightning.aggregation.RelativeGainWeighting\n"
    "    init_args: {aggregator: fedrl_lightning.aggregation.FedAvg}",
}


class LocalGrid:
    """The part of Flower's ``Grid`` our transport uses, delivering each message to a ClientApp in this process.

    Real Flower messages, records and ClientApp (the one ``flwr run`` starts), without a SuperLink or Ray workers,
    so every aggregator runs through our Flower apps in seconds; node k is partition k - 1. A raised error becomes
    Flower's error reply, as on a SuperNode.
    """

    def __init__(self, app: object, num_nodes: int) -> None:
        try:  # newer flwr stamps messages with the process's task identity: set what a ServerApp process has
            from flwr.supercore.task_identity import TaskIdentity

            TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
        except ModuleNotFoundError:
            pass
        self.app, self.nodes = app, list(range(1, num_nodes + 1))

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Context, Error, Message, RecordDict

        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            context = Context(1, node, {"partition-id": node - 1}, RecordDict(), {})
            try:
                replies.append(self.app(msg, context))
            except Exception as err:
                replies.append(Message(error=Error(code=1, reason=str(err)), reply_to=msg))
        return replies


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_every_aggregator_through_the_flower_apps_gives_the_in_process_adapter(tmp_path, flower_env, name):
    """3 clients x 2 rounds through ``FedRLStrategy``, the ServerApp's server and the ClientApp's client."""
    from fedrl_lightning.flower.client_app import build_client_app
    from fedrl_lightning.flower.server_app import run_server

    text = (
        f"trainer:\n  aggregation:\n    class_path: {AGGREGATORS[name]}\n  eval_before_training: false\n"
        "data:\n  num_clients: 3\n  partition: iid\n"
    )
    fragment = write_fragment(tmp_path, text)
    out = tmp_path / "flower"
    defaults = {"config": f"{TINY} {fragment}", "overrides": f"--trainer.output_dir {out}", "node-wait-timeout": 5.0}
    run_server(LocalGrid(build_client_app(defaults), 3), FlowerSettings.from_run_config({}, defaults))
    flower = server_state(out)
    reference = in_process_run(fragment, tmp_path / "reference")
    assert flower["round"] == 2 and not any(k.startswith("faults/client") for k in flower["history"][-1])
    diff = assert_same_run(flower, reference, initial_adapter(fragment, tmp_path / "initial"))
    assert _same_tensors(flower["aggregation"], reference["aggregation"]), "the aggregators' server states differ"
    print(f"{name}: max |Flower - in-process| = {diff}")


def _same_tensors(a: object, b: object) -> bool:
    """Nested server states equal, tensors within ATOL."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape:
            return False
        return a.numel() == 0 or float((a.double() - b.double()).abs().max()) <= ATOL
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same_tensors(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and math.isclose(a, b, rel_tol=1e-9))


# -- our server optimizers against Flower's own strategies ---------------------------------------------------------

# Ours (convention="flower", the default) and Flower's strategy with the same hyperparameters: Flower's defaults for
# the FedOpt family (the legacy API's tau, 1e-9 for FedAdam/FedAdagrad, is set to the Message API's 1e-3), a
# momentum for FedAvgM (Flower's default 0.0 would be plain FedAvg).
SERVER_OPTIMIZERS = {
    "FedAdam": ({}, {}),
    "FedYogi": ({}, {}),
    "FedAdagrad": ({}, {}),
    "FedAvgM": ({"server_lr": 0.7, "momentum": 0.9}, {"server_learning_rate": 0.7, "server_momentum": 0.9}),
}
CLIENT_EXAMPLES = (1, 2, 5)


def _client_deltas(num_rounds: int = 3) -> list[list[dict[str, torch.Tensor]]]:
    """Per round, per client: float64 deltas spanning |Δ| from ~1e-5 (below tau) to ~1 (above it)."""
    gen = torch.Generator().manual_seed(0)

    def delta(*shape: int) -> torch.Tensor:
        scale = 10 ** (-5 * torch.rand(shape, generator=gen, dtype=torch.float64))
        return torch.randn(shape, generator=gen, dtype=torch.float64) * scale

    return [[{"a": delta(3, 4), "b": delta(5)} for _ in CLIENT_EXAMPLES] for _ in range(num_rounds)]


def _run_ours(name: str, x0: dict[str, torch.Tensor], deltas: list) -> dict[str, torch.Tensor]:
    from fedrl_lightning import aggregation

    agg, x = getattr(aggregation, name)(**SERVER_OPTIMIZERS[name][0]), x0
    for round_deltas in deltas:
        updates = [
            ClientUpdate(c, {k: x[k] + d[k] for k in x}, n)
            for c, (d, n) in enumerate(zip(round_deltas, CLIENT_EXAMPLES))
        ]
        x = agg.aggregate(x, updates)
    return x


def _run_flower(name: str, x0: dict[str, torch.Tensor], deltas: list) -> dict[str, torch.Tensor]:
    """Flower's Message-API strategy, driven as its ``start()`` does: configure_train, the replies, aggregate_train."""
    from flwr.app import ConfigRecord, Message
    from flwr.serverapp import strategy

    flower, x = getattr(strategy, name)(**SERVER_OPTIMIZERS[name][1]), x0
    grid = LocalGrid(app=None, num_nodes=len(CLIENT_EXAMPLES))
    for server_round, round_deltas in enumerate(deltas, start=1):
        messages = list(flower.configure_train(server_round, records.to_record(x), ConfigRecord(), grid))
        replies = [
            Message(records.update_to_content(ClientUpdate(c, {k: x[k] + d[k] for k in x}, n)), reply_to=msg)
            for c, (msg, d, n) in enumerate(zip(messages, round_deltas, CLIENT_EXAMPLES, strict=True))
        ]
        arrays, _ = flower.aggregate_train(server_round, replies)
        x = records.from_record(arrays, x)
    return x


def _run_flower_legacy(name: str, x0: dict[str, torch.Tensor], deltas: list) -> dict[str, torch.Tensor]:
    """The older ``flwr.server.strategy`` API (``aggregate_fit`` on ``FitRes``), still in Flower 1.32-1.42."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import strategy

    def params(state: dict[str, torch.Tensor]):
        return ndarrays_to_parameters([state[k].numpy() for k in sorted(state)])

    kwargs = {"tau": 1e-3} if name in ("FedAdam", "FedAdagrad") else {}
    flower = getattr(strategy, name)(initial_parameters=params(x0), **kwargs, **SERVER_OPTIMIZERS[name][1])
    x = x0
    for server_round, round_deltas in enumerate(deltas, start=1):
        results = [
            (None, FitRes(Status(Code.OK, ""), params({k: x[k] + d[k] for k in x}), n, {}))
            for d, n in zip(round_deltas, CLIENT_EXAMPLES)
        ]
        parameters, _ = flower.aggregate_fit(server_round, results, [])
        x = {k: torch.from_numpy(a.copy()) for k, a in zip(sorted(x), parameters_to_ndarrays(parameters))}
    return x


@pytest.mark.parametrize("api", ["serverapp", "legacy"])
@pytest.mark.parametrize("name", list(SERVER_OPTIMIZERS))
def test_server_optimizers_equal_flowers_strategies_after_three_rounds(name, api):
    """Our FedAdam/FedYogi/FedAdagrad/FedAvgM (convention="flower") against Flower's own strategy objects."""
    from fedrl_lightning import aggregation

    if api == "serverapp" and name != "FedAvgM":  # our defaults are Flower's
        import inspect

        from flwr.serverapp import strategy

        theirs = inspect.signature(getattr(strategy, name)).parameters
        ours = inspect.signature(getattr(aggregation, name)).parameters
        for key in ("eta", "beta_1", "beta_2", "tau"):
            if key in theirs:
                assert ours[key].default == theirs[key].default, key
    x0 = {"a": torch.randn(3, 4, dtype=torch.float64), "b": torch.randn(5, dtype=torch.float64)}
    deltas = _client_deltas()
    ours = _run_ours(name, x0, deltas)
    flower = (_run_flower if api == "serverapp" else _run_flower_legacy)(name, x0, deltas)
    diff = max_diff(ours, flower)
    assert diff <= ATOL, f"{name}: ours and Flower's {api} strategy differ by {diff}"
    assert max_diff(ours, x0) > CHANGED, "the rounds did not change the arrays"
    print(f"{name} ({api}): max |ours - Flower| = {diff:.2e}")


# -- a Flower simulation -----------------------------------------------------------------------------------------


def test_simulation_equals_the_in_process_run_and_a_restarted_server_resumes(tmp_path, flower_env):
    """2 SuperNodes x 2 rounds of SCAFFOLD (client-side objective) with FGRPO weights (client-side baselines)."""
    from flwr.simulation import run_simulation

    from fedrl_lightning.flower.client_app import build_client_app
    from fedrl_lightning.flower.server_app import build_server_app

    fragment = write_fragment(tmp_path, SCAFFOLD_FGRPO)
    out = tmp_path / "flower"
    defaults = {
        "config": f"{TINY} {fragment}",
        "overrides": f"--trainer.output_dir {out}",
        "node-wait-timeout": 60.0,
        "round-timeout": 180.0,  # a hung client fails the round instead of blocking the test
    }
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}}

    def simulate() -> dict:
        run_simulation(build_server_app(defaults), build_client_app(defaults), num_supernodes=2, backend_config=backend)
        return server_state(out)

    flower = simulate()
    reference = in_process_run(fragment, tmp_path / "reference")
    initial = initial_adapter(fragment, tmp_path / "initial")
    diff = assert_same_run(flower, reference, initial)
    assert all(f"client{i}/fgrpo/weight" in flower["history"][-1] for i in (0, 1))
    assert set(flower["aggregation"]["aggregator"]["c"]) == set(initial)  # SCAFFOLD's c is checkpointed
    print(f"simulation: max |Flower - in-process| = {diff}")

    # The server dies after its clients finished round 2 but before it checkpointed the round: restart it.
    shutil.rmtree(out / "checkpoints" / "round-000002")
    state_files = {p: p.stat().st_mtime_ns for p in (out / "clients").glob("client*/round-*/state.pt")}
    resumed = simulate()
    assert_same_run(resumed, reference, initial)
    for path, mtime in state_files.items():  # round 1 was not trained again; round 2 was, from round 1's states
        assert (path.stat().st_mtime_ns == mtime) == ("round-000001" in str(path)), path


# -- a deployment on loopback ------------------------------------------------------------------------------------


def _wait_port(port: int, timeout: float, procs: list[subprocess.Popen]) -> None:
    """Until 127.0.0.1:``port`` accepts a connection; fails at once if a started process has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a Flower process exited early (code {[p.poll() for p in procs]})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"127.0.0.1:{port} did not answer within {timeout} s")


def test_deployment_superlink_and_two_supernodes_on_loopback_run_a_round(tmp_path, flower_env):
    """A ``flower-superlink`` and 2 ``flower-supernode`` processes (--insecure, free ports); ``flwr run`` submits."""
    fragment = write_fragment(tmp_path, FEDADAM_SERVER_FGRPO)
    out = tmp_path / "flower"
    fleet, serverappio, port = free_port(), free_port(), free_port()  # port: the Control API, where `flwr run` goes
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    (tmp_path / "flwr-home").mkdir()
    (tmp_path / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    run_config = tmp_path / "run.toml"
    run_config.write_text(
        f'config = "{TINY} {fragment}"\noverrides = "--trainer.output_dir {out}"\n'
        "node-wait-timeout = 60.0\nround-timeout = 180.0\n"
    )
    procs: list[subprocess.Popen] = []
    logs: list[IO[str]] = []

    def start(name: str, command: str, *extra: str) -> None:
        logs.append(open(tmp_path / f"{name}.log", "w"))
        args = [*command.split(), *extra]
        procs.append(
            subprocess.Popen(
                [str(BIN / args[0]), *args[1:]],
                env=env,
                cwd=tmp_path,
                stdout=logs[-1],
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    try:
        # The app's code is installed here already: no `uv sync` (and no network for it).
        addresses = (
            f"--fleet-api-address 127.0.0.1:{fleet} --serverappio-api-address 127.0.0.1:{serverappio} "
            f"--control-api-address 127.0.0.1:{port}"
        )
        start("superlink", f"flower-superlink --insecure {addresses} --disable-runtime-dependency-installation")
        _wait_port(port, 60, procs)
        for i in range(2):
            command = (
                f"flower-supernode --insecure --superlink 127.0.0.1:{fleet} "
                f"--clientappio-api-address 127.0.0.1:{free_port()} --node-config"
            )
            start(f"supernode{i}", command, f"partition-id={i} num-partitions=2")
        command = [str(BIN / "flwr"), "run", str(APP), "loopback", "--run-config", str(run_config), "--stream"]
        run = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=420)
    finally:
        for proc in procs:  # each leads its own process group, with the app processes it started
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in procs:
            proc.wait(timeout=30)
        for handle in logs:
            handle.close()
    logs_text = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("*.log")))
    assert run.returncode == 0, f"flwr run failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}\n{logs_text}"
    assert (out / "checkpoints" / "round-000001").is_dir(), logs_text
    flower = server_state(out)
    reference = in_process_run(fragment, tmp_path / "reference")
    diff = assert_same_run(flower, reference, initial_adapter(fragment, tmp_path / "initial"))
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert sorted(p.name for p in (out / "clients").iterdir()) == ["client0", "client1"]  # state on the clients' side
    assert {"client0/eval/accuracy", "client1/eval/accuracy"} <= flower["history"][-1].keys()
    print(f"deployment: max |Flower - in-process| = {diff}")


# -- Federated PPO: a personalized aggregator, per-client messages ------------------------------------------------

PEER_MIXTURE = """
trainer:
  aggregation:
    class_path: fedrl_lightning.algorithms.fedppo.PeerMixture
    init_args: {self_preference: 0.5}
  eval_before_training: false
model:
  class_path: fedrl_lightning.modules.PPOModule
  init_args:
    learning_rate: 1e-2
    reward_funcs: [conftest.length_reward]
    reward_weights: [1.0]
    kl_coef: 0.5
    num_iterations: 1
    peer_reference: fedrl_lightning.algorithms.fedppo.PeerReference
data:
  num_clients: 3
  partition: iid
"""


def test_a_peer_mixture_run_through_the_flower_apps_gives_each_client_the_in_process_adapter(tmp_path, flower_env):
    """3 clients x 2 rounds of Federated PPO: each client is sent its own peers' snapshots, keeps its own adapter."""
    from fedrl_lightning.flower.client_app import build_client_app
    from fedrl_lightning.flower.server_app import run_server

    fragment = tmp_path / "fragment.yaml"
    fragment.write_text(PEER_MIXTURE)
    out = tmp_path / "flower"
    defaults = {"config": f"{TINY} {fragment}", "overrides": f"--trainer.output_dir {out}", "node-wait-timeout": 5.0}
    run_server(LocalGrid(build_client_app(defaults), 3), FlowerSettings.from_run_config({}, defaults))
    flower, reference = server_state(out), in_process_run(fragment, tmp_path / "reference")
    initial = initial_adapter(fragment, tmp_path / "initial")
    assert flower["round"] == reference["round"] == 2 and not any("faults/client" in k for k in flower["history"][-1])
    snapshots = flower["aggregation"]["snapshots"]
    assert sorted(snapshots) == [0, 1, 2]
    for cid, own in reference["aggregation"]["snapshots"].items():  # what each client published in round 2
        assert max_diff(snapshots[cid], own) <= ATOL and max_diff(own, initial) > CHANGED
        saved = ClientStateStore(out / "clients", cid).load(before_round=3).adapter  # and kept on its own disk
        assert max_diff(saved, own) <= ATOL
    rows = {row["round"]: row for row in flower["history"]}
    for ref_row in reference["history"]:  # per-client mixing weights, KL, held-out metrics of its own adapter
        for key, value in ref_row.items():
            if "timing/" not in key and not key.startswith("comm/"):
                assert math.isclose(rows[ref_row["round"]][key], value, rel_tol=1e-6, abs_tol=1e-9), key
    # round 1 sends no snapshot (nobody has published); round 2 sends each client its two peers'
    adapter = sum(v.numel() * v.element_size() for v in initial.values())
    assert rows[1]["comm/bytes_down"] < adapter < 6 * adapter < rows[2]["comm/bytes_down"]
