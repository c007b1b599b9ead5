"""Dataset-scale attribution: what is stored equals dynamiclrp.relevance, the store is plain Zarr, a killed job
resumes without losing or duplicating a sample, 2 ranks equal 1 rank bit for bit, and the CLI runs the same job."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import dynamiclrp
from dynamiclrp import dataset as D

zarr = pytest.importorskip("zarr")

sys.path.insert(0, str(Path(__file__).parent))
import dataset_job  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
JOB = Path(__file__).resolve().parent / "dataset_job.py"
ARRAYS = ("relevance", "target", "logit", "prediction", "label", "relevance_sum", "batch_seed",
          "batch_unaccounted", "block_done")


def _env() -> dict:
    """Subprocesses import this checkout's dynamiclrp and run on one thread, like the tests."""
    env = dict(os.environ)
    src = str(Path(dynamiclrp.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, str(JOB.parent), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _arrays(path: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(path, mode="r")
    return {k: np.asarray(g[k][:]) for k in ARRAYS}


def _assert_same_store(a: Path, b: Path) -> None:
    x, y = _arrays(a), _arrays(b)
    for k in ARRAYS:
        assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
        same = (x[k] == y[k]) | (np.isnan(x[k]) & np.isnan(y[k])) if x[k].dtype.kind == "f" else x[k] == y[k]
        rows = np.flatnonzero(~same.reshape(len(same), -1).all(1))
        assert not len(rows), (f"{k} differs at {len(rows)} of {len(same)} rows {rows[:12].tolist()}, max |diff| "
                               f"{np.nanmax(np.abs(x[k].astype(np.float64) - y[k].astype(np.float64))):.3g}")


@pytest.fixture
def one_thread() -> None:
    """Bit equality with the subprocesses (one thread each) needs the same kernels here: one thread, whatever an
    earlier test left behind."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dynamiclrp", "attribute", "--model", f"{JOB}:model", *args]


# ==============================================================================================================
# what is stored
# ==============================================================================================================
def test_stored_relevance_equals_relevance_of_the_same_batch(tmp_path: Path) -> None:
    model, data = dataset_job.model(), dataset_job.data(100)
    summary = dynamiclrp.attribute_dataset(model, data, rules="epsilon", target="label", batch_size=16,
                                           chunk_size=32, ledger_every=3, out=tmp_path / "r.zarr", progress=False)
    assert (summary.n_samples, summary.n_computed, summary.world_size) == (100, 100, 1)
    g = D.open_store(tmp_path / "r.zarr")
    x_all, y_all = data.tensors
    for i in range(0, 100, 16):
        x = x_all[i:i + 16].clone().requires_grad_(True)
        y = y_all[i:i + 16]
        logits = model(x)
        (expected,) = dynamiclrp.relevance(logits.gather(1, y[:, None]).squeeze(1), x, rules="epsilon",
                                          model=model)
        assert np.array_equal(g["relevance"][i:i + 16], expected.numpy())  # bit for bit
        assert np.array_equal(g["logit"][i:i + 16], logits.gather(1, y[:, None]).squeeze(1).detach().numpy())
        assert np.array_equal(g["prediction"][i:i + 16], logits.argmax(1).numpy())
        np.testing.assert_allclose(g["relevance_sum"][i:i + 16], expected.double().sum((1, 2, 3)).numpy(),
                                   rtol=1e-12, atol=1e-12)
    assert np.array_equal(g["target"][:], y_all.numpy()) and np.array_equal(g["label"][:], y_all.numpy())
    # the ledger ran on batches 0, 3, 6 and accounts for their relevance
    unacc, seed = g["batch_unaccounted"][:], g["batch_seed"][:]
    assert np.flatnonzero(~np.isnan(unacc)).tolist() == [0, 3, 6]
    assert summary.ledger_batches == 3
    assert np.all(np.abs(unacc[[0, 3, 6]]) <= 1e-5 * np.abs(seed[[0, 3, 6]]))
    assert summary.mean_abs_unaccounted <= 1e-5
    meta = g.attrs["dynamiclrp"]
    assert meta["complete"] and meta["schema"]["chunk_size"] == 32
    assert meta["job"]["parameters_sha256"] == D.parameter_hash(model)
    assert meta["schema"]["metadata"]["versions"]["torch"] == torch.__version__


def test_model_and_caller_state_are_untouched(tmp_path: Path) -> None:
    model = dataset_job.model()
    before = D.parameter_hash(model)
    flags = [p.requires_grad for p in model.parameters()]
    rng = torch.get_rng_state()
    with torch.no_grad():  # the job turns grad mode on for itself only
        dynamiclrp.attribute_dataset(model, dataset_job.data(40), batch_size=16, out=tmp_path / "r.zarr",
                                     progress=False)
        assert not torch.is_grad_enabled()
    assert D.parameter_hash(model) == before
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_reduce_float16_and_targets(tmp_path: Path) -> None:
    model, data = dataset_job.model(), dataset_job.data(48)
    full = tmp_path / "full.zarr"
    dynamiclrp.attribute_dataset(model, data, target=3, batch_size=16, out=full, progress=False)
    small = tmp_path / "small.zarr"
    dynamiclrp.attribute_dataset(model, data, target=3, batch_size=16, out=small, reduce="channels+pool2",
                                 dtype="float16", progress=False)
    r = torch.from_numpy(D.open_store(full)["relevance"][:])
    g = D.open_store(small)
    assert g["relevance"].shape == (48, 4, 4) and g["relevance"].dtype == np.float16
    expected = r.sum(1).reshape(48, 4, 2, 4, 2).sum((2, 4)).to(torch.float16).numpy()
    assert np.array_equal(g["relevance"][:], expected)
    assert np.array_equal(g["relevance_sum"][:], D.open_store(full)["relevance_sum"][:])  # before reduction
    assert set(g["target"][:].tolist()) == {3}
    # a callable target: the runner-up class of each row
    runner_up = tmp_path / "runner_up.zarr"
    dynamiclrp.attribute_dataset(model, data, target=lambda scores, labels: scores.argsort(1)[:, -2],
                                 batch_size=16, out=runner_up, progress=False)
    logits = model(data.tensors[0])
    assert np.array_equal(D.open_store(runner_up)["target"][:], logits.argsort(1)[:, -2].numpy())
    with pytest.raises(ValueError, match="no labels"):
        dynamiclrp.attribute_dataset(model, data.tensors[0], target="label", out=tmp_path / "x.zarr",
                                     progress=False)
    with pytest.raises(ValueError, match="unknown reduce step"):
        dynamiclrp.attribute_dataset(model, data, reduce="chanels", out=tmp_path / "y.zarr", progress=False)


def test_reduce_relevance_conserves_sums() -> None:
    r = torch.randn(3, 2, 7, 5, dtype=torch.float64)
    pooled = D.reduce_relevance(r, "channels+pool3")
    assert pooled.shape == (3, 3, 2)
    torch.testing.assert_close(pooled.sum((1, 2)), r.sum((1, 2, 3)))
    torch.testing.assert_close(D.reduce_relevance(r, "hidden"), r.sum(-1))


def test_sources_give_the_same_store(tmp_path: Path) -> None:
    """A Dataset, a DataLoader, a list of batches and a generator of unknown length are the same job."""
    model, data = dataset_job.model(), dataset_job.data(70)
    x, y = data.tensors
    ref = tmp_path / "ref.zarr"
    dynamiclrp.attribute_dataset(model, data, batch_size=16, chunk_size=32, out=ref, progress=False)
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 70, 16)]
    variants = {
        "loader": DataLoader(data, batch_size=16, shuffle=False),
        "list": batches,
        "generator": (b for b in batches),
    }
    for name, source in variants.items():
        out = tmp_path / f"{name}.zarr"
        s = dynamiclrp.attribute_dataset(model, source, chunk_size=32, out=out, progress=False)
        assert s.n_samples == 70, name
        _assert_same_store(ref, out)
    with pytest.raises(ValueError, match="shuffles"):
        dynamiclrp.attribute_dataset(model, DataLoader(data, batch_size=16, shuffle=True),
                                     out=tmp_path / "s.zarr", progress=False)
    with pytest.raises(ValueError, match="every batch except the last"):
        dynamiclrp.attribute_dataset(model, [batches[0], batches[1][0][:5], batches[2]], out=tmp_path / "u.zarr",
                                     progress=False)


def test_hf_text_model_is_attributed_to_input_embeddings(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from dynamiclrp.testing import zoo
    model = zoo.build("bert").model.eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (10, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[::3, 9:] = 0
    labels = torch.randint(0, 3, (10,), generator=gen)
    rows = {"input_ids": ids, "attention_mask": mask, "label": labels}
    try:
        import datasets
        data = datasets.Dataset.from_dict({k: v.tolist() for k, v in rows.items()})
    except ImportError:  # plain dict batches are the same job
        data = [{k: v[i:i + 4] for k, v in rows.items()} for i in range(0, 10, 4)]
    s = dynamiclrp.attribute_dataset(model, data, rules="attnlrp", target="label", batch_size=4, reduce="hidden",
                                     out=tmp_path / "bert.zarr", progress=False)
    g = D.open_store(tmp_path / "bert.zarr")
    assert s.n_samples == 10 and g["relevance"].shape == (10, 12)
    assert g.attrs["dynamiclrp"]["schema"]["relevance_of"] == "input embeddings (of input_ids)"
    for i in range(0, 10, 4):
        emb = model.get_input_embeddings()(ids[i:i + 4]).detach().requires_grad_(True)
        logits = model(inputs_embeds=emb, attention_mask=mask[i:i + 4]).logits
        (r,) = dynamiclrp.relevance(logits.gather(1, labels[i:i + 4, None]).squeeze(1), emb, rules="attnlrp",
                                    model=model)
        assert np.array_equal(g["relevance"][i:i + 4], r.sum(-1).numpy())
    assert np.array_equal(g["label"][:], labels.numpy())


class _Half(nn.Module):
    def __init__(self, n_in: int, n_out: int, relu: bool) -> None:
        super().__init__()
        self.linear, self.relu = nn.Linear(n_in, n_out, bias=False), relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return torch.relu(y) if self.relu else y


class _Split(nn.Module):
    """Two halves on (possibly) different devices; the activation hops between them as with ``device_map``."""

    def __init__(self, first: str, second: str) -> None:
        super().__init__()
        self.first, self.second = _Half(6, 16, True).to(first), _Half(16, 4, False).to(second)
        self.second_device = torch.device(second)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        return self.second(h.to(self.second_device, copy=True))  # a copy node, like a real device hop

    def _apply(self, *args, **kwargs):  # .to(), .cuda(), .cpu(), .half() all end here
        if getattr(self, "_built", False):
            raise AssertionError("the job moved or cast the model")
        return super()._apply(*args, **kwargs)


def test_model_split_over_devices_is_explained_in_place(tmp_path: Path) -> None:
    torch.manual_seed(0)
    second = "cuda" if torch.cuda.is_available() else "cpu"
    model = _Split("cpu", second).eval().requires_grad_(False)
    model._built = True
    x = torch.randn(20, 6)
    s = dynamiclrp.attribute_dataset(model, x, rules="zero", batch_size=8, out=tmp_path / "split.zarr",
                                     progress=False)
    g = D.open_store(tmp_path / "split.zarr")
    assert s.n_samples == 20
    # LRP-0 through bias-free layers: every unit of the logit reaches the input, across the device hop
    np.testing.assert_allclose(g["relevance_sum"][:], g["logit"][:], rtol=1e-5, atol=1e-6)
    assert np.all(np.abs(g["relevance"][:]).sum(1) > 0)


# ==============================================================================================================
# the store
# ==============================================================================================================
def test_store_is_plain_zarr_readable_without_dynamiclrp(tmp_path: Path) -> None:
    out = tmp_path / "r.zarr"
    dynamiclrp.attribute_dataset(dataset_job.model(), dataset_job.data(50), target="label", batch_size=16,
                                 out=out, progress=False)
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["dynamiclrp"] = None          # importing dynamiclrp now fails
        import numpy as np, zarr
        g = zarr.open_group({str(out)!r}, mode="r")
        rel = g["relevance"][:]
        meta = g.attrs["dynamiclrp"]
        out = {{"shape": list(rel.shape), "sum": float(rel.astype(np.float64).sum()),
               "labels": g["label"][:].tolist(), "rules": meta["job"]["rules"], "complete": meta["complete"]}}
        try:
            import xarray as xr
        except ImportError:
            xr = None
        if xr is not None:
            ds = xr.open_zarr({str(out)!r}, consolidated=False)
            out["xarray"] = [ds.sizes["sample"], float(ds["relevance"].sum().values)]
        print(json.dumps(out))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=120)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    g = D.open_store(out)
    assert got["shape"] == [50, 1, 8, 8] and got["complete"] is True
    assert got["sum"] == pytest.approx(float(g["relevance"][:].astype(np.float64).sum()), rel=1e-12)
    assert got["labels"] == dataset_job.data(50).tensors[1].tolist()
    assert got["rules"].startswith("RuleSet('epsilon'")
    if "xarray" in got:
        assert got["xarray"][0] == 50 and got["xarray"][1] == pytest.approx(got["sum"], rel=1e-5)


def test_store_of_another_job_is_refused(tmp_path: Path) -> None:
    model, data = dataset_job.model(), dataset_job.data(40)
    out = tmp_path / "r.zarr"
    dynamiclrp.attribute_dataset(model, data, batch_size=16, out=out, progress=False)
    again = dynamiclrp.attribute_dataset(model, data, batch_size=16, out=out, progress=False)
    assert again.n_computed == 0 and again.n_samples == 40  # finished: nothing to do
    with pytest.raises(D.StoreError, match="different job.*rules"):
        dynamiclrp.attribute_dataset(model, data, rules="zero", batch_size=16, out=out, progress=False)
    s = dynamiclrp.attribute_dataset(model, data, rules="zero", batch_size=16, out=out, overwrite=True,
                                     progress=False)
    assert s.n_computed == 40
    other = tmp_path / "notes"
    other.mkdir()
    (other / "a.txt").write_text("mine")
    with pytest.raises(D.StoreError, match="not a relevance store"):
        dynamiclrp.attribute_dataset(model, data, out=other, progress=False)
    assert (other / "a.txt").read_text() == "mine"
    with pytest.raises(D.StoreError, match="no relevance store"):
        D.open_store(tmp_path / "missing.zarr")


def test_progress_bar_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    s = dynamiclrp.attribute_dataset(dataset_job.model(), dataset_job.data(64), batch_size=16,
                                     out=tmp_path / "r.zarr", progress=True)
    err = capsys.readouterr().err
    assert "samples               64 (64 explained now)" in err
    assert "samples/s" in err and "mean |unaccounted|" in err and "store size" in err
    assert s.store_bytes > 0 and s.samples_per_second > 0


# ==============================================================================================================
# resume after a kill, 2 ranks = 1 rank, the CLI
# ==============================================================================================================
def test_killed_job_resumes_without_losing_or_duplicating_samples(tmp_path: Path, one_thread: None) -> None:
    out = tmp_path / "r.zarr"
    cmd = [*_cli("--data", f"{JOB}:Slow", "--out", str(out), "--batch-size", "10", "--chunk-size", "20",
                 "--target", "label", "--ledger-every", "4", "--threads", "1", "--no-progress")]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done = int(np.asarray(zarr.open_group(out, mode="r")["block_done"][:]).sum())
        except Exception:  # noqa: BLE001 - not created yet
            done = 0
        if done >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the job ended before it could be killed: {proc.communicate()[1].decode()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    g = zarr.open_group(out, mode="r")
    committed = int(np.asarray(g["block_done"][:]).sum())
    assert 3 <= committed < 15 and not g.attrs["dynamiclrp"]["complete"]
    with pytest.raises(D.StoreError, match="not complete"):
        D.open_store(out)

    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)  # the same command
    assert res.returncode == 0, res.stderr
    history = D.open_store(out).attrs["dynamiclrp"]["history"]
    assert history[-1]["n_computed"] == 300 - 20 * committed  # only the blocks that were not committed

    ref = tmp_path / "ref.zarr"
    dynamiclrp.attribute_dataset(dataset_job.model(), dataset_job.data(), batch_size=10, chunk_size=20,
                                 target="label", ledger_every=4, out=ref, progress=False)
    _assert_same_store(ref, out)


def test_two_ranks_equal_one_rank_bit_for_bit(tmp_path: Path, one_thread: None) -> None:
    pytest.importorskip("torch.distributed")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    args = ["--data", f"{JOB}:data", "--batch-size", "8", "--chunk-size", "16", "--target", "predicted",
            "--ledger-every", "5", "--no-progress"]
    one = dynamiclrp.attribute_dataset(dataset_job.model(), dataset_job.data(), batch_size=8, chunk_size=16,
                                       target="predicted", ledger_every=5, out=tmp_path / "one.zarr",
                                       progress=False)  # one thread (conftest), like each rank
    assert one.world_size == 1
    env = _env()
    env.pop("WORLD_SIZE", None)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--standalone", "-m", "dynamiclrp", "attribute", "--model", f"{JOB}:model", *args,
                          "--out", str(tmp_path / "two.zarr")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    _assert_same_store(tmp_path / "one.zarr", tmp_path / "two.zarr")
    history = D.open_store(tmp_path / "two.zarr").attrs["dynamiclrp"]["history"]
    assert history[-1]["world_size"] == 2 and history[-1]["n_computed"] == 300


def test_cli_reports_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dynamiclrp.cli import main
    out = str(tmp_path / "r.zarr")
    assert main(["attribute", "--model", f"{JOB}:model", "--data", f"{JOB}:nothing", "--out", out]) == 2
    assert "has no attribute 'nothing'" in capsys.readouterr().err
    assert main(["attribute", "--model", f"{JOB}:model", "--data", f"{JOB}:data", "--target", "maybe",
                 "--out", out]) == 2
    assert "--target must be" in capsys.readouterr().err
    assert main(["attribute", "--model", f"{JOB}:data", "--data", f"{JOB}:data", "--out", out]) == 2
    assert "not a torch.nn.Module" in capsys.readouterr().err


def test_cli_stores_concepts(tmp_path: Path) -> None:
    """``--concepts``: every unit's relevance and activation of the named layers, next to unchanged heatmaps."""
    from dynamiclrp.cli import main
    common = ["attribute", "--model", f"{JOB}:model", "--data", f"{JOB}:data", "--batch-size", "50", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "a.zarr")]) == 0
    assert main([*common, "--out", str(tmp_path / "b.zarr"), "--concepts", "features.2", "classifier.3:input",
                 "--concept-unit", "channel"]) == 0
    a, b = D.open_store(tmp_path / "a.zarr"), D.open_store(tmp_path / "b.zarr")
    assert np.array_equal(a["relevance"][:], b["relevance"][:])
    assert b["concepts/features.2/relevance"].shape == (300, 16)
    assert b["concepts/classifier.3@input/activation"].shape == (300, 64)
    assert b.attrs["dynamiclrp"]["job"]["concepts"] == ["features.2", "classifier.3:input"]


@pytest.mark.slow  # a harness check, not a property: kept out of the default run's time budget
def test_throughput_benchmark_runs_on_toy_sizes() -> None:
    """benchmarks/dataset_throughput.py end to end on a few samples (no timing assertions)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import dataset_throughput as bench
        rows = bench.measure(["cnn"], 64, 1, 2)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
        sys.modules.pop("dataset_throughput", None)
    assert len(rows) == 6 and all(r["samples_per_s"] > 0 and r["n"] == 64 for r in rows)
    assert "attribute_dataset" in bench.table(rows, [])
