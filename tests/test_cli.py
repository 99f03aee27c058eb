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
