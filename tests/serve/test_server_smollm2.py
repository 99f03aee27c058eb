"""``edgert serve`` on SmolLM2-135M (slow: `make test-slow`, not in CI): the default (q4)
export served, answers equal to Engine.generate, plain and streamed, for concurrent clients."""

from __future__ import annotations

import threading

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

import edgert  # noqa: E402
from edgert.serve.server import make_service  # noqa: E402
from tests.serve.test_server import running, wait_ready  # noqa: E402

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Give me three tips for better sleep.",
           "Write a Python function that adds two numbers.", "Why do cats purr?"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from edgert.export.exporter import ExportOptions, export_model

    out = tmp_path_factory.mktemp("smollm2_serve") / "artifact"
    export_model("smollm2-135m", out, ExportOptions(max_context=1024), log=lambda m: None)
    return out


def ask_concurrently(client, prompts: list[str]) -> dict[str, str]:
    """Each prompt from a thread of its own (greedy, 48 tokens): prompt -> reply text."""
    got = {}

    def ask(prompt):
        got[prompt] = client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": prompt}],
            max_tokens=48, temperature=0).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return got


def test_served_answers_equal_generate(artifact):
    engine = edgert.load(artifact)
    want = {p: engine.generate(p, max_new_tokens=48).text for p in PROMPTS}
    del engine
    with running(make_service(artifact)) as base:
        wait_ready(base)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        assert ask_concurrently(client, PROMPTS) == want
        stream = client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": PROMPTS[0]}],
            max_tokens=48, temperature=0, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == want[PROMPTS[0]]


EIGHT = PROMPTS + ["Name two planets.", "What is 12 times 12?", "Define photosynthesis.",
                   "Suggest a name for a dog."]


@pytest.fixture(scope="module")
def fp32_artifact(tmp_path_factory):
    from edgert.export.exporter import ExportOptions, export_model
    from edgert.export.quantize import WeightOptions

    out = tmp_path_factory.mktemp("smollm2_serve_fp32") / "artifact"
    export_model("smollm2-135m", out, ExportOptions(
        max_context=1024, weights=WeightOptions(weights="fp32")), log=lambda m: None)
    return out


def test_parallel_slots_answer_each_client_as_alone(fp32_artifact):
    """8 concurrent clients on 4 batched slots (fp32 weights: batched rows compute what a
    solo run does) each get exactly Engine.generate's text."""
    engine = edgert.load(fp32_artifact)
    want = {p: engine.generate(p, max_new_tokens=48).text for p in EIGHT}
    del engine
    with running(make_service(fp32_artifact, parallel=4)) as base:
        wait_ready(base)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        assert ask_concurrently(client, EIGHT) == want
