"""The report: derived columns, speedups, winners, the seed table, summary.md, the make-report driver."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from iceaggr_lib import envinfo, report, results
from iceaggr_lib.bench import CSV_COLUMNS


def row(backend, b, median, mode="forward", dtype="float32", heads=1, status="ok", first=None, message="",
        host=np.nan):
    return dict(backend=backend, dtype=dtype, mode=mode, n_heads=heads, head_dim=128 // heads, batch_size=b,
                n_pulses=100 * b, n_doms=60 * b, max_dom_pulses=30, status=status, message=message, median_ms=median,
                p20_ms=median, p80_ms=median, prep_ms=0.0, host_ms=host, first_call_ms=first if first else 2 * median,
                peak_mem_mb=1.0, rel_err=0.0, device="cuda:0", torch_version="2.x")


def table(rows):
    return pd.DataFrame(rows, columns=CSV_COLUMNS)


ENV = {"copy_bandwidth_gbps": 2000.0, "device": "cuda:0", "gpu_name": "Test GPU", "torch_version": "2.x"}


def test_floor_and_throughput():
    df = results.with_derived(table([row("padded", 4, 2.0, dtype="bfloat16")]), ENV)
    floor_bytes = (3 * 400 + 240) * 128 * 2  # q, k, v read + DOM output written, bf16
    assert df["floor_ms"].iloc[0] == pytest.approx(floor_bytes / 2000e9 * 1e3)
    assert df["x_floor"].iloc[0] == pytest.approx(2.0 / df["floor_ms"].iloc[0])
    assert df["pulses_per_s"].iloc[0] == pytest.approx(400 / 2e-3)


def test_speedups_winners_and_regimes():
    rows = []
    for b, (loop, padded, flex) in {4: (10, 1, 5), 16: (40, 2, 3), 64: (160, 8, 4), 256: (640, 30, 6)}.items():
        rows += [row("loop", b, loop), row("padded", b, padded), row("flex_dense", b, flex)]
    rows.append(row("fast_but_wrong", 64, 0.1, status="error", message="wrong result: rel_err 0.5 > tolerance 1e-05"))
    df = results.with_derived(table(rows), ENV)
    sp = results.speedups(df, "loop").set_index(["backend", "batch_size"])
    assert sp.loc[("padded", 16), "speedup"] == pytest.approx(20.0)
    assert sp.loc[("flex_dense", 256), "speedup"] == pytest.approx(640 / 6)
    assert "fast_but_wrong" not in sp.index.get_level_values(0)
    win = results.winners(df).set_index("batch_size")
    assert win["winner"].to_dict() == {4: "padded", 16: "padded", 64: "flex_dense", 256: "flex_dense"}
    assert win.loc[64, "runner_up"] == "padded" and win.loc[64, "margin"] == pytest.approx(2.0)
    reg = results.regimes(results.winners(df))
    assert reg[["batch_sizes", "winner"]].values.tolist() == [["4-16", "padded"], ["64-256", "flex_dense"]]


def test_speedups_and_winners_rank_by_the_time_per_batch_where_rows_have_it():
    # padded's median of all calls is the faster, but its per-batch mean is the slower: the per-batch time decides,
    # for both sides of a speedup alike; a row without batch_mean_ms (older CSVs) keeps its median.
    padded, flex, loop = row("padded", 64, 1.0), row("flex_dense", 64, 1.2), row("loop", 64, 10.0)
    padded["batch_mean_ms"], flex["batch_mean_ms"] = 1.5, 1.25
    df = results.with_derived(table([padded, flex, loop]), ENV)
    win = results.winners(df).iloc[0]
    assert win["winner"] == "flex_dense" and win["time_ms"] == pytest.approx(1.25)
    assert win["runner_up_ms"] == pytest.approx(1.5)
    sp = results.speedups(df, "loop").set_index("backend")
    assert sp.loc["padded", "speedup"] == pytest.approx(10.0 / 1.5)
    assert sp.loc["flex_dense", "time_ms"] == pytest.approx(1.25)


def test_seed_comparison_keeps_the_seeds_numbers_and_adds_ours():
    rows = [row("loop", 4, 9.0, first=50.0), row("flex_dense", 16, 0.5, first=4000.0), row("padded", 8, 1.0),
            row("padded", 8, 0.2, dtype="bfloat16")]
    seed = results.seed_comparison(table(rows)).set_index("batch_size")
    assert seed.loc[4, "seed_loop_ms"] == 33.3 and seed.loc[16, "seed_flex_ms"] == 23.4
    assert seed.loc[8, "seed_padded_ms"] == 23.0 and seed.loc[16, "seed_pulses"] == 1305
    assert seed.loc[4, "our_loop_ms"] == 9.0 and seed.loc[4, "our_loop_first_ms"] == 50.0
    assert seed.loc[16, "our_flex_dense_first_ms"] == 4000.0
    assert seed.loc[8, "our_padded_ms"] == 1.0  # float32 preferred over bfloat16
    assert np.isnan(seed.loc[8, "our_loop_ms"])


def test_summary_markdown_is_computed_from_the_rows():
    rows = [row("loop", 4, 10.0), row("padded", 4, 1.0), row("flex_dense", 4, 2.0),
            row("varlen", 4, np.nan, status="unsupported", message="UnsupportedError: no cpu")]
    md = results.summary_markdown(results.with_derived(table(rows), ENV), ENV)
    assert "Test GPU" in md and "## Winner per regime" in md
    assert "| forward | float32 | 1 | 4 | padded |" in md
    assert "UnsupportedError: no cpu" in md
    assert "33.3" in md  # the seed's table, labelled as the seed's
    assert "seed's published numbers" in md
    assert "nan" not in md.lower().replace("nanogpt", "")


def test_winners_table_shows_host_time_where_measured():
    """The per-point table carries the winner's host_ms once a run measured it, and leaves the column out for
    CSVs from before it (all NaN), so no 'nan' reaches the summary."""
    rows = [row("padded", 4, 1.0, host=0.9), row("flex_dense", 4, 2.0, host=0.3)]
    md = results.summary_markdown(results.with_derived(table(rows), ENV), ENV)
    assert "| host_ms |" in md and "| 0.9 |" in md
    old = results.with_derived(table([row("padded", 4, 1.0)]), ENV)
    md = results.summary_markdown(old, ENV)
    assert "host_ms" not in md and "nan" not in md.lower().replace("nanogpt", "")
    assert "host_ms" not in results.winners(old)  # nor in the table the report notebook displays


def test_load_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="benchmark.csv"):
        results.load(tmp_path)
    table([row("padded", 4, 1.0)]).to_csv(tmp_path / "benchmark.csv", index=False)
    (tmp_path / "environment.json").write_text(json.dumps(ENV))
    df, env = results.load(tmp_path)
    assert df["message"].tolist() == [""] and env["gpu_name"] == "Test GPU"


def test_default_grid_follows_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = report.default_grid()
    assert cpu["dtypes"] == ["float32"] and max(cpu["batch_sizes"]) <= 64 and "reference" not in cpu["backends"]
    gpu = report.default_grid("gpu")
    assert gpu["batch_sizes"][0] == 4 and gpu["batch_sizes"][-1] == 4096 and set(gpu["n_heads"]) == {1, 8}
    assert {"loop", "padded", "flex_dense", "flex_block", "varlen"} <= set(gpu["backends"])
    assert "reference" not in gpu["backends"]
    with pytest.raises(ValueError):
        report.default_grid("tpu")


def test_ensure_sample_keeps_an_existing_data_set(tmp_path):
    (tmp_path / "train_meta.parquet").write_bytes(b"not regenerated")
    assert report.ensure_sample(tmp_path, n_events=10) == tmp_path
    assert (tmp_path / "train_meta.parquet").read_bytes() == b"not regenerated"


def test_ensure_sample_generates_the_kaggle_layout(tmp_path):
    pytest.importorskip("iceaggr_lib.data.sample")
    out = report.ensure_sample(tmp_path / "s", n_events=30, seed=1)
    assert (out / "train_meta.parquet").exists() and (out / "sensor_geometry.csv").exists()
    assert list((out / "train").glob("batch_*.parquet"))
    assert not (tmp_path / "s.partial").exists()


def test_environment_info_on_cpu(tmp_path):
    info = envinfo.collect("cpu", measure_bandwidth=False)
    for key in ("cpu_model", "torch_version", "triton_version", "nvidia_driver", "settings", "device"):
        assert key in info
    assert info["settings"]["float32_matmul_precision"] in ("highest", "high", "medium")
    bw = envinfo.measure_copy_bandwidth("cpu", n_bytes=8 << 20, repeats=3)
    assert 1e8 < bw < 1e13
    path = envinfo.write(tmp_path / "environment.json", info)
    assert json.loads(path.read_text())["device"] == "cpu"


def test_source_digest_names_the_code(tmp_path):
    """environment.json carries a digest of iceaggr_lib's sources: equal for equal code, changed by any edit."""
    info = envinfo.collect("cpu", measure_bandwidth=False)
    assert info["iceaggr_lib_digest"] == envinfo.source_digest() and len(info["iceaggr_lib_digest"]) == 16
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 2\n")
    before = envinfo.source_digest(tmp_path / "pkg")
    assert envinfo.source_digest(tmp_path / "pkg") == before
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 3\n")
    assert envinfo.source_digest(tmp_path / "pkg") != before
    with pytest.raises(FileNotFoundError, match="no Python sources under .*empty"):
        envinfo.source_digest(tmp_path / "empty")


def test_fused_targets_checked_from_rows():
    def r(backend, b, median, mode="forward", dtype="bfloat16", heads=1, prep=0.0, mem=1.0):
        out = row(backend, b, median, mode=mode, dtype=dtype, heads=heads)
        out.update(prep_ms=prep, peak_mem_mb=mem)
        return out

    rows = [r("dom_fused", 1024, 0.1, mem=10.0), r("varlen", 1024, 1.5), r("flex_block", 1024, 0.9, prep=0.5),
            r("padded", 1024, 30.0), r("dom_fused", 1024, 0.3, mode="forward_backward"),
            r("flex_block", 1024, 1.4, mode="forward_backward", prep=0.2)]
    env = {"copy_bandwidth_gbps": 3000.0}
    df = results.with_derived(table(rows), env)
    t = results.fused_targets(df).set_index("target")
    # best library forward: flex_block 0.9 - 0.5 = 0.4 ms -> 4x; varlen 15x; fwd+bwd: 1.2 / 0.3 = 4x < 5x
    assert t.loc["forward 1024 ev bf16 1x128: >= 3x faster than the best library", "met"] == "yes"
    assert "flex_block 0.4 ms: 4x" in t.loc["forward 1024 ev bf16 1x128: >= 3x faster than the best library",
                                             "measured"]
    assert t.loc["forward 1024 ev bf16 1x128: >= 10x faster than varlen", "met"] == "yes"
    assert t.loc["forward_backward 1024 ev bf16 1x128: >= 5x faster than the best library", "met"] == "no"
    assert t.loc["forward 4096 ev float32 8x16: <= 3x the memory floor", "met"] == "not measured"
    floor = df[df["backend"] == "dom_fused"]["floor_ms"].iloc[0]
    assert t.loc["forward 1024 ev bfloat16 1x128: <= 3x the memory floor", "met"] == ("yes" if 0.1 <= 3 * floor
                                                                                        else "no")
    assert results.fused_targets(df[df["backend"] != "dom_fused"]).empty
    correct = "correct against the float64 reference, every bfloat16 row (rel err <= 0.01)"
    assert t.loc[correct, "met"] == "yes" and "over 2 rows" in t.loc[correct, "measured"]
    wrong = r("dom_fused", 4096, 0.5)
    wrong.update(status="error", rel_err=0.5, message="wrong result: rel_err 0.5 > tolerance 0.01")
    t_wrong = results.fused_targets(results.with_derived(table(rows + [wrong]), env)).set_index("target")
    assert t_wrong.loc[correct, "met"] == "no" and "1 error rows" in t_wrong.loc[correct, "measured"]
    # a ratio just over the goal reads as over it (the committed 8x16 row: 3.002x, not "3x" beside "no")
    env = {"copy_bandwidth_gbps": 3000.0}
    floor_8x16 = results.with_derived(table([r("dom_fused", 4096, 1.0, dtype="float32", heads=8)]), env)["floor_ms"]
    just_over = table([r("dom_fused", 4096, 3.002 * floor_8x16.iloc[0], dtype="float32", heads=8)])
    t = results.fused_targets(results.with_derived(just_over, env)).set_index("target")
    cell = t.loc["forward 4096 ev float32 8x16: <= 3x the memory floor"]
    assert cell["met"] == "no" and ": 3.002x (at the measured 3,000 GB/s: 3.002x)" in cell["measured"], cell["measured"]
    # the floor is at 3 TB/s: a row under 3x of the floor at a slower measured copy rate is still over
    slow = {"copy_bandwidth_gbps": 2950.0}
    floor_slow = results.with_derived(table([r("dom_fused", 4096, 1.0, dtype="float32", heads=8)]), slow)["floor_ms"]
    under = table([r("dom_fused", 4096, 2.99 * floor_slow.iloc[0], dtype="float32", heads=8)])
    cell = results.fused_targets(results.with_derived(under, slow)).set_index("target").loc[
        "forward 4096 ev float32 8x16: <= 3x the memory floor"]
    assert cell["met"] == "no" and "3.041x (at the measured 2,950 GB/s: 2.990x)" in cell["measured"], cell["measured"]
    assert "## The fused kernel's targets" in results.summary_markdown(df, {"copy_bandwidth_gbps": 3000.0})
    # a row with per-batch times is judged by them (the floor is the mean batch's), the median of calls shown beside
    split = r("dom_fused", 4096, 3.05 * floor_8x16.iloc[0], dtype="float32", heads=8)
    split["batch_mean_ms"] = 2.95 * floor_8x16.iloc[0]
    derived = results.with_derived(table([split]), env)
    assert derived["x_floor"].iloc[0] == pytest.approx(2.95)
    label = "forward 4096 ev float32 8x16: <= 3x the memory floor"
    cell = results.fused_targets(derived).set_index("target").loc[label]
    assert cell["met"] == "yes" and ": 2.950x" in cell["measured"], cell["measured"]
    assert "per batch (median of all calls" in cell["measured"], cell["measured"]


def test_driver_passes_parameters_and_reports_failures(tmp_path, monkeypatch):
    import nbformat

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train_meta.parquet").write_bytes(b"")
    out = tmp_path / "out"
    out.mkdir()
    (out / "benchmark.csv").write_text("stale")
    calls = []

    def fake_run(name, out_dir, parameters, kernel_name="python3"):
        calls.append((name, parameters))
        if name == "02_benchmark":
            (out_dir / "benchmark.csv").write_text("rows so far")
            raise RuntimeError("kernel died")
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(f"# {name}")])
        path = out_dir / f"{name}.ipynb"
        nbformat.write(nb, path)
        return path

    monkeypatch.setattr(report, "run_notebook", fake_run)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = report.main(["--out", str(out), "--data-dir", str(tmp_path / "data"), "--batch-sizes", "4", "8",
                        "--backends", "padded"])
    assert code == 1  # 02 failed
    names = [c[0] for c in calls]
    assert names == ["01_sparsity", "02_benchmark", "03_report"]  # 03 still ran on the rows 02 finished
    bench = calls[1][1]
    assert bench["batch_sizes"] == [4, 8] and bench["backends"] == ["padded"] and bench["dtypes"] == ["float32"]
    assert bench["data_dir"] == str(tmp_path / "data") and bench["out_dir"] == str(out)
    assert calls[2][1] == {"results_dir": str(out), "out_dir": str(out)}
    assert (out / "01_sparsity.html").read_text().count("01_sparsity") >= 1
    assert (out / "benchmark.csv").read_text() == "rows so far"  # the stale CSV was removed first


def test_load_merges_parts_of_one_grid(tmp_path):
    for name, dtype in (("bf16", "bfloat16"), ("fp32", "float32")):
        d = tmp_path / name
        d.mkdir()
        table([row("padded", 4, 1.0, dtype=dtype), row("loop", 4, 9.0, dtype=dtype)]).to_csv(d / "benchmark.csv",
                                                                                             index=False)
        extra = {"iceaggr_lib_digest": "0123456789abcdef"} if name == "bf16" else {}  # fp32: a part from before it
        (d / "environment.json").write_text(json.dumps(dict(ENV, device_name=f"GPU {name}", **extra)))
    df, env = results.load([tmp_path / "bf16", tmp_path / "fp32"])
    assert len(df) == 4 and set(df["dtype"]) == {"bfloat16", "float32"}
    assert env["gpu_name"] == "Test GPU" and [m["device_name"] for m in env["merged_from"]] == ["GPU bf16", "GPU fp32"]
    assert [m["iceaggr_lib_digest"] for m in env["merged_from"]] == ["0123456789abcdef", None]
    summary = results.summary_markdown(results.with_derived(df, env), env)  # each part's code version named
    assert "iceaggr_lib sources 0123456789abcdef" in summary and "iceaggr_lib sources not recorded" in summary
    with pytest.raises(ValueError, match="more than one"):
        results.load([tmp_path / "bf16", tmp_path / "bf16"])


def test_each_part_keeps_its_own_copy_bandwidth(tmp_path):
    """Parts measured on different machines: a row's memory floor uses the bandwidth its part measured."""
    for name, dtype, gbps in (("bf16", "bfloat16", 3000.0), ("fp32", "float32", 1500.0)):
        d = tmp_path / name
        d.mkdir()
        table([row("padded", 4, 1.0, dtype=dtype)]).to_csv(d / "benchmark.csv", index=False)
        (d / "environment.json").write_text(json.dumps(dict(ENV, copy_bandwidth_gbps=gbps)))
    df, env = results.load([tmp_path / "bf16", tmp_path / "fp32"])
    derived = results.with_derived(df, env)
    floor = derived.set_index("dtype")["floor_ms"]
    io_bytes = derived.set_index("dtype")["io_mb"] * 2**20
    assert floor["bfloat16"] == pytest.approx(io_bytes["bfloat16"] / 3000e9 * 1e3)
    assert floor["float32"] == pytest.approx(io_bytes["float32"] / 1500e9 * 1e3)
    assert "bf16 3000.0 GB/s, fp32 1500.0 GB/s" in results.summary_markdown(derived, env)


def test_summary_names_each_parts_machine(tmp_path):
    """Parts run on different hosts (lent machines): the summary says which part ran where, and when."""
    for name, host in (("bf16", "Linux-host-a"), ("fp32", "Linux-host-b")):
        d = tmp_path / name
        d.mkdir()
        table([row("padded", 4, 1.0, dtype="bfloat16" if name == "bf16" else "float32")]).to_csv(
            d / "benchmark.csv", index=False)
        (d / "environment.json").write_text(json.dumps(dict(ENV, device_name="H100", platform=host,
                                                            created_utc=f"2026-12-07T1{len(name)}:00",
                                                            triton_version="3.6.0")))
    df, env = results.load([tmp_path / "bf16", tmp_path / "fp32"])
    md = results.summary_markdown(results.with_derived(df, env), env)
    assert "bf16 H100, torch" in md and "host Linux-host-a" in md and "host Linux-host-b" in md
    assert "triton 3.6.0" in md and "measured 2026-12-07T14:00" in md


def test_driver_rejects_a_bad_grid_before_any_work(tmp_path, capsys):
    """An unknown dtype stops the driver at once (exit 2, the dtype named), before the sample or a notebook."""
    with pytest.raises(SystemExit) as stop:
        report.main(["--out", str(tmp_path / "out"), "--dtypes", "nodtype", "--notebooks", "02_benchmark"])
    assert stop.value.code == 2
    assert "the benchmark grid: unknown dtype 'nodtype'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_driver_report_only_over_merged_parts(tmp_path, monkeypatch):
    for name, dtype in (("a", "bfloat16"), ("b", "float32")):
        (tmp_path / name).mkdir()
        table([row("padded", 4, 1.0, dtype=dtype)]).to_csv(tmp_path / name / "benchmark.csv", index=False)
        (tmp_path / name / "environment.json").write_text(json.dumps(dict(ENV, device_name=f"GPU {name}")))
    calls = []
    monkeypatch.setattr(report, "run_notebook", lambda name, out_dir, parameters, kernel_name="python3":
                        calls.append((name, parameters)) or None)
    code = report.main(["--out", str(tmp_path / "out"), "--notebooks", "03_report", "--no-html",
                        "--results-dirs", str(tmp_path / "a"), str(tmp_path / "b")])
    assert code == 0
    assert calls == [("03_report", {"results_dir": [str(tmp_path / "a"), str(tmp_path / "b")],
                                    "out_dir": str(tmp_path / "out")})]
    merged = results.read_results(tmp_path / "out" / "benchmark.csv")  # the parts' rows, for outside tools
    assert list(merged.columns) == CSV_COLUMNS and list(merged["dtype"]) == ["bfloat16", "float32"]
    env = json.loads((tmp_path / "out" / "environment.json").read_text())
    assert [m["device_name"] for m in env["merged_from"]] == ["GPU a", "GPU b"]


def test_driver_names_a_missing_part_and_goes_on(tmp_path, monkeypatch, capsys):
    """A --results-dirs part without its CSV: the merge fails naming the file, the notebooks still run, exit 1."""
    (tmp_path / "a").mkdir()
    calls = []
    monkeypatch.setattr(report, "run_notebook", lambda name, out_dir, parameters, kernel_name="python3":
                        calls.append(name) or None)
    code = report.main(["--out", str(tmp_path / "out"), "--notebooks", "03_report", "--no-html",
                        "--results-dirs", str(tmp_path / "a")])
    assert code == 1 and calls == ["03_report"]
    assert str(tmp_path / "a" / "benchmark.csv") in capsys.readouterr().err
