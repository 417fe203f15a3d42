"""tritonpipe bench --variant: runs taken in turn, and the medians read against the first variant."""

import csv
from pathlib import Path

import pytest

from tritonpipe.errors import ConfigError
from tritonpipe.harness.bench import BenchOptions, BenchResult, Row
from tritonpipe.harness.bench.stats import BatchTimes
from tritonpipe.harness.bench.variants import SUMMARY_COLUMNS, Variant, run_variants
from tritonpipe_tools.bench import main


def test_a_variant_is_a_name_and_keys():
    assert Variant.parse("pinned:pin_inputs=true preferred_batch_size=32,64") == Variant(
        "pinned", {"pin_inputs": "true", "preferred_batch_size": "32,64"})
    assert Variant.parse("plain:") == Variant("plain", {})
    for bad in ("plain", ":x=1", "two words:x=1", "a:x"):
        with pytest.raises(ConfigError):
            Variant.parse(bad)


def fake_runs(throughputs):
    """A run_bench stand-in: records each run's options and answers the next figures in turn."""
    seen, figures = [], iter(throughputs)

    def run(options, say):
        seen.append(options)
        rows = [Row("ensemble", c, next(figures), p50_ms=10.0 * c, p99_ms=20.0 * c, gpu_mem_before_mb=100.0,
                    gpu_mem_mb=100.0 + c, sm_busy=30.0 + len(seen), jpeg_busy=None if c == 8 else 80.0)
                for c in (1, 8)] + [Row("inprocess", 64, 999.0), Row("inprocess-pre-2", 64, 1999.0)]
        # at c=8: one batch of 8 every run, and 8 batches of 1 in the first run, 4 of 1 and 2 of 2 after it
        small = [(1, 8)] if len(seen) == 1 else [(1, 4), (2, 2)]
        batches = [BatchTimes("ensemble", 1, "pre", 1, 10, 0.1, 1.0, 0.1)] + [
            BatchTimes("ensemble", 8, "pre", size, count, 0.1, 1.0, 0.1) for size, count in [*small, (8, 1)]]
        return BenchResult(rows, [], "", {}, batches=batches)

    return run, seen


def options(tmp_path, config):
    return BenchOptions(config=config, settings={"max": "4", "batching_timeout": "1"}, systems=("ensemble", "inprocess"),
                        output=tmp_path / "out", command="tritonpipe bench --rounds 3")


@pytest.fixture
def config(tmp_path, tiny_onnx):
    path = tmp_path / "tiny.toml"
    path.write_text('name = "cls"\nbackend = "S[DecodeTensor,ResizeTensor,SyncTensor[TensorrtTensor]]"\n'
                    f'resize_h = 32\nresize_w = 32\nmodel = "{tiny_onnx}"\n')
    return path


def test_variants_run_in_turn_with_their_keys_over_the_shared_ones(tmp_path, config):
    run, seen = fake_runs([100, 200, 150, 300, 110, 220, 160, 290, 120, 240, 140, 310])
    variants = [Variant("a", {}), Variant("b", {"max": "8"})]
    result = run_variants(options(tmp_path, config), variants, 3, say=lambda line: None, run=run)
    assert [(o.output.name, o.settings) for o in seen] == [
        (f"{name}-{r}", {"max": "8" if name == "b" else "4", "batching_timeout": "1"}) for r in (1, 2, 3) for name in "ab"]
    assert seen[3].command == "tritonpipe bench --rounds 3 [variant b, round 2: max=8]"
    rows = {(r.variant, r.concurrency): r for r in result.rows if r.system == "ensemble"}
    assert rows[("a", 1)].throughputs == (100, 110, 120) and rows[("b", 8)].throughputs == (300, 290, 310)
    assert rows[("b", 1)].gpu_rise_mb == 1 and rows[("a", 8)].p99_ms == 160
    assert "| b | ensemble | 1 | 150 / 160 / 140 | 150.0 | 1.36× |" in result.markdown  # 150 against a's median 110
    assert "| a | ensemble | 8 | 200 / 220 / 240 | 220.0 | 1.00× |" in result.markdown
    assert "| b | inprocess | 64 |" in result.markdown and result.complete
    # the in-process run's side rows are compared too, after the served ones
    assert "| b | inprocess-pre-2 | 64 | 1,999 / 1,999 / 1,999 | 1,999.0 | 1.00× |" in result.markdown
    assert result.markdown.index("| a | ensemble") < result.markdown.index("| a | inprocess-pre-2")
    with open(result.files["variants_csv"]) as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == SUMMARY_COLUMNS
    assert table[0] == {"variant": "a", "system": "ensemble", "concurrency": "1", "runs": "3", "median": "110",
                        "low": "100", "high": "120", "p50_ms": "10.0", "p99_ms": "20.0", "gpu_rise_mb": "1.0",
                        "sm_busy": "33.0", "jpeg_busy": "80.0", "mean_batch": "1.0", "biased_batch": "1.0"}
    # the busy readings' medians over the rounds (a's runs were the 1st, 3rd and 5th), "—" where there were none
    assert "| 10.00 | 20.00 | 1 | 33 / 80 |" in result.markdown and "| a | inprocess | 64 | 999 / 999 / 999 | 999.0 | 1.00× | — | — | — | — |" \
        in result.markdown
    assert (tmp_path / "out" / "variants.md").read_text() == result.markdown
    # the batches at c=8: a's first run 9 batches of 16 images (mean 1.78; the average image in (8 + 64) / 16 = 4.5),
    # its later runs 7 of 16 (2.29; (4 + 8 + 64) / 16 = 4.75): the medians over its three runs
    assert (rows[("a", 8)].mean_batch, rows[("a", 8)].biased_batch) == pytest.approx((16 / 7, 4.75))
    assert "| 2.3 / 4.8 |" in result.markdown
    assert "| a | inprocess | 64 | 999 / 999 / 999 | 999.0 | 1.00× | — | — | — | — | — |" in result.markdown


def test_a_failed_level_shows_as_a_gap_and_the_run_is_incomplete(tmp_path, config):
    run, _ = fake_runs([100, None, 120, 130])
    result = run_variants(options(tmp_path, config), [Variant("a", {}), Variant("b", {})], 1, say=lambda line: None, run=run)
    assert "| b | ensemble | 1 | 120 | 120.0 | 1.20× |" in result.markdown
    assert "| a | ensemble | 8 | — | — | — |" in result.markdown and not result.complete


def test_a_comparison_stopped_part_way_keeps_the_runs_it_finished(tmp_path, config):
    finished, seen = fake_runs([100, 200, 150, 300, 110, 220])

    def run(options, say):
        if len(seen) == 3:
            raise KeyboardInterrupt  # the fourth run, stopped (Ctrl-C, or a time limit)
        return finished(options, say)

    lines = []
    with pytest.raises(KeyboardInterrupt):
        run_variants(options(tmp_path, config), [Variant("a", {}), Variant("b", {})], 2, say=lines.append, run=run)
    text = (tmp_path / "out" / "variants.md").read_text()
    assert "- runs done: 3 of 4; the table holds what they measured" in text
    assert "| a | ensemble | 1 | 100 / 110 | 105.0 | 1.00× |" in text
    assert "| b | ensemble | 8 | 300 | 300.0 | 1.43× |" in text  # against a's median of 200 and 220
    with open(tmp_path / "out" / "variants.csv") as handle:
        assert {(r["variant"], r["concurrency"], r["runs"]) for r in csv.DictReader(handle) if r["system"] == "ensemble"} == {
            ("a", "1", "2"), ("a", "8", "2"), ("b", "1", "1"), ("b", "8", "1")}
    assert f"so far (3 of 4 runs): {tmp_path / 'out' / 'variants.md'}" in lines


def test_a_variant_can_serve_under_mps_and_the_others_not(tmp_path, config, monkeypatch):
    from tritonpipe.harness.bench import variants as module

    monkeypatch.setattr(module, "find_control", lambda: "/usr/bin/nvidia-cuda-mps-control")  # a host with MPS
    run, seen = fake_runs([100, 200, 150, 300, 110, 220])
    variants = [Variant("plain", {}), Variant("mps", {"mps": "true", "max": "8"}), Variant("off", {"mps": "False"})]
    run_variants(options(tmp_path, config), variants, 1, say=lambda line: None, run=run)
    assert [(o.output.name, o.mps, o.settings.get("max")) for o in seen] == [
        ("plain-1", False, "4"), ("mps-1", True, "8"), ("off-1", False, "4")]
    assert all("mps" not in o.settings for o in seen)  # not a node key: no stage is given it
    with pytest.raises(ConfigError, match="variant 'bad': parameter 'mps' must be bool, got 'sometimes'"):
        run_variants(options(tmp_path, config), [Variant("ok", {}), Variant("bad", {"mps": "sometimes"})], 1,
                     say=lambda line: None, run=run)
    assert len(seen) == 3  # refused before any of its runs


def test_a_variant_under_mps_on_a_host_without_it_is_refused_before_any_run(tmp_path, config, monkeypatch):
    from tritonpipe.harness.bench import variants as module

    def missing():
        raise ConfigError("--mps needs NVIDIA's nvidia-cuda-mps-control")

    monkeypatch.setattr(module, "find_control", missing)
    run, seen = fake_runs([100, 200])
    with pytest.raises(ConfigError, match="variant 'mps': --mps needs NVIDIA's nvidia-cuda-mps-control"):
        run_variants(options(tmp_path, config), [Variant("plain", {}), Variant("mps", {"mps": "true"})], 1,
                     say=lambda line: None, run=run)
    assert not seen


def test_a_bad_variant_is_refused_before_any_run_or_file(tmp_path, config):
    run, seen = fake_runs([])
    for variants, rounds, match in (([Variant("a", {}), Variant("b", {"resize_hh": "3"})], 1, "variant 'b'.*resize_hh"),
                                    # a key every stage knows, refused only once the repository's configs are built
                                    ([Variant("a", {}), Variant("c", {"decoder": "torchvision", "decode_depth": "2"})], 1,
                                     "variant 'c'.*decode_depth tunes"),
                                    ([Variant("a", {}), Variant("a", {})], 1, "must differ"),
                                    ([Variant("a", {})], 0, "at least 1"), ([], 1, "at least one")):
        with pytest.raises(ConfigError, match=match):
            run_variants(options(tmp_path, config), variants, rounds, say=lambda line: None, run=run)
    assert not seen and not (tmp_path / "out").exists()


def test_variants_of_the_built_in_example_use_its_model(tmp_path, tiny_onnx, monkeypatch):
    from tritonpipe.harness.bench import variants

    monkeypatch.setattr(variants, "default_model", lambda output: Path(tiny_onnx))  # the checkout's example model
    run, seen = fake_runs([100, 200, 110, 220])
    small = {"resize_h": "32", "resize_w": "32"}  # the tiny model's input
    plain = BenchOptions(systems=("ensemble",), settings=small, output=tmp_path / "out", device="cpu")
    result = run_variants(plain, [Variant("a", {}), Variant("one", {"instance_num": "1"})], 1, say=lambda line: None, run=run)
    assert [(o.config, o.model, o.settings) for o in seen] == [
        (None, Path(tiny_onnx), small), (None, Path(tiny_onnx), {**small, "instance_num": "1"})]
    assert result.complete
    with pytest.raises(ConfigError, match="variant 'b'.*resize_hh"):
        run_variants(plain, [Variant("a", {}), Variant("b", {"resize_hh": "3"})], 1, say=lambda line: None, run=run)


def test_the_cli_says_what_is_wrong_with_a_variant_in_one_line(tmp_path, capsys):
    assert main(["--variant", "no colon", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith("error: --variant takes NAME:KEY=VALUE") and "Traceback" not in err
    assert not Path(tmp_path / "o").exists()
