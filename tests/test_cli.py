from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from edgert.cli import main


def test_run_json(tiny_artifact, tiny_engine):
    result = CliRunner().invoke(main, ["run", str(tiny_artifact), "--prompt", "Explain lists",
                                       "--max-new-tokens", "12", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert set(record) == {"prompt_ids", "output_ids", "text", "stats"}
    expected = tiny_engine.generate("Explain lists", max_new_tokens=12)
    assert record["output_ids"] == expected.output_ids


def test_run_streams_text(tiny_artifact, tiny_engine):
    result = CliRunner().invoke(main, ["run", str(tiny_artifact), "--prompt", "Explain lists",
                                       "--max-new-tokens", "12"])
    assert result.exit_code == 0
    expected = tiny_engine.generate("Explain lists", max_new_tokens=12).text
    assert result.stdout == expected + "\n"


def test_run_speculative_lookup(tiny_artifact, tiny_engine):
    result = CliRunner().invoke(main, ["run", str(tiny_artifact), "--prompt", "Explain lists",
                                       "--max-new-tokens", "40", "--speculative", "lookup"])
    assert result.exit_code == 0, result.output
    expected = tiny_engine.generate("Explain lists", max_new_tokens=40).text
    assert result.stdout == expected + "\n"
    assert "lookup" in result.stderr and "tokens/step" in result.stderr
    bad = CliRunner().invoke(main, ["run", str(tiny_artifact), "--prompt", "x",
                                    "--speculative", "lookup", "--no-medusa"])
    assert bad.exit_code != 0 and "--no-medusa is --speculative off" in bad.output


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "edgert.cli", *args], capture_output=True,
                          text=True, timeout=300)


def assert_one_line_error(proc, needle):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and proc.stderr.strip().endswith(error_lines[0]), proc.stderr
    assert needle in error_lines[0]


def test_errors_are_one_line(tiny_artifact, tmp_path):
    assert_one_line_error(run_cli("run", str(tmp_path / "missing"), "--prompt", "x"),
                          "does not exist")
    assert_one_line_error(run_cli("run", str(tiny_artifact), "--prompt", "x",
                                  "--max-new-tokens", "100000"), "KV capacity")
    assert_one_line_error(run_cli("run", str(tiny_artifact), "--prompt", ""), "empty")
    assert_one_line_error(run_cli("run", str(tiny_artifact), "--prompt", "x", "--top-p", "2"),
                          "top_p")
    assert_one_line_error(run_cli("export", "no-such-model", "-o", str(tmp_path / "o")),
                          "unknown model 'no-such-model'")
    assert_one_line_error(run_cli("tune-tree", str(tiny_artifact), "--drafter", "draft"),
                          "has no draft layer")


def test_export_takes_dhsa_parameters(tiny_dir, tmp_path):
    from edgert.artifact.io import load_manifest

    args = ["export", str(tiny_dir), "-o", str(tmp_path / "art"), "--max-context", "512",
            "--no-heads", "--dhsa", "block_size=16", "--dhsa", "budget=64", "--dhsa",
            "local=32", "--dhsa", "sink=4", "--dhsa", "min_context=128", "--dhsa",
            "prefill_chunk=64", "--dhsa", "boundary_threshold=1.5"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    dhsa = load_manifest(tmp_path / "art").dhsa
    assert (dhsa["budget"], dhsa["prefill_chunk"], dhsa["boundary_threshold"]) == (64, 64, 1.5)
    result = CliRunner().invoke(main, ["export", str(tiny_dir), "-o", str(tmp_path / "none"),
                                       "--max-context", "512", "--no-heads", "--no-dhsa"])
    assert result.exit_code == 0, result.output
    assert load_manifest(tmp_path / "none").dhsa is None


def test_bad_dhsa_parameters_are_one_line_errors(tiny_dir, tmp_path):
    out = str(tmp_path / "o")
    assert_one_line_error(run_cli("export", str(tiny_dir), "-o", out, "--dhsa", "budgit=9"),
                          "KEY one of block_size")
    assert_one_line_error(run_cli("export", str(tiny_dir), "-o", out, "--dhsa", "budget=big"),
                          "needs a number")
    assert_one_line_error(run_cli("export", str(tiny_dir), "-o", out, "--dhsa",
                                  "prefill_chunk=1000"), "multiple of")
    assert not (tmp_path / "o").exists()


def test_a_prompt_that_is_not_utf8_is_one_line(tiny_artifact):
    import os

    proc = subprocess.run([sys.executable, "-m", "edgert.cli", "run", str(tiny_artifact),
                           "--prompt", os.fsdecode(b"caf\xe9 au lait"), "--max-new-tokens", "4"],
                          capture_output=True, text=True, timeout=300)
    assert_one_line_error(proc, "not valid UTF-8")
