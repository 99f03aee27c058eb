"""``edgert serve`` with the real ``openai`` client on loopback (tiny model)."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
import httpx2 as httpx  # noqa: E402  (the openai client's HTTP library)

import edgert  # noqa: E402
from edgert.serve.app import ServeOptions, Service, build_app  # noqa: E402
from edgert.serve.server import make_service  # noqa: E402

MESSAGES = [{"role": "user", "content": "Explain lists"}]


@contextlib.contextmanager
def running(service: Service):
    """The app of ``service`` on a free loopback port; yields the base URL."""
    server = uvicorn.Server(uvicorn.Config(build_app(service), host="127.0.0.1", port=0,
                                           log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def wait_ready(url: str) -> None:
    deadline = time.time() + 60
    while httpx.get(f"{url}/health").status_code != 200:
        assert time.time() < deadline, "engine did not load"
        time.sleep(0.05)


@pytest.fixture(scope="module", params=[1, 4], ids=["one-slot", "four-slots"])
def url(tiny_artifact, request):
    """The server with one slot (speculative decoding, requests in turn) and with four
    (batched decoding): every test below holds for both."""
    with running(make_service(tiny_artifact, max_queue=8, parallel=request.param)) as base:
        wait_ready(base)
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def want(tiny_engine, prompt=MESSAGES, chat=True, n=24):
    return tiny_engine.generate(prompt, max_new_tokens=n, chat=chat)


def test_chat_completion_equals_generate(client, tiny_engine):
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24,
                                           temperature=0)
    expected = want(tiny_engine)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.stats["finish_reason"]
    assert reply.usage.prompt_tokens == len(expected.prompt_ids)
    assert reply.usage.completion_tokens == len(expected.output_ids)


def test_streamed_chat_equals_generate_and_reports_usage(client, tiny_engine):
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    expected = want(tiny_engine)
    assert "".join(pieces) == expected.text
    assert finish == expected.stats["finish_reason"]
    assert usage.completion_tokens == len(expected.output_ids)


def test_text_completion_equals_generate(client, tiny_engine):
    reply = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16,
                                      temperature=0)
    assert reply.choices[0].text == want(tiny_engine, "Once upon a time", chat=False, n=16).text


def test_stop_sequences_cut_the_text(client, tiny_engine):
    full = want(tiny_engine, n=40).text
    # a two-character stop string whose first occurrence is past the start of the text
    cut = next(k for k in range(1, len(full) - 1) if full.find(full[k:k + 2]) == k)
    stop = full[cut:cut + 2]
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=40,
                                           temperature=0, stop=[stop])
    assert reply.choices[0].message.content == full[:full.find(stop)]
    assert reply.choices[0].finish_reason == "stop"


PERSON_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
    "langs": {"type": "array", "items": {"enum": ["python", "c", "rust"]}, "maxItems": 3}},
    "required": ["name", "age", "langs"], "additionalProperties": False}


@pytest.mark.parametrize("seed", [1, 2])
def test_json_schema_reply_parses_and_validates(client, seed):
    import json

    jsonschema = pytest.importorskip("jsonschema")
    reply = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=200, temperature=0.9, seed=seed,
        response_format={"type": "json_schema", "json_schema": {
            "name": "person", "schema": PERSON_SCHEMA, "strict": True}})
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON_SCHEMA)


def test_unsupported_schema_is_400_naming_the_keyword(client):
    with pytest.raises(openai.BadRequestError, match="pattern"):
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=20,
            response_format={"type": "json_schema", "json_schema": {
                "name": "x", "schema": {"type": "string", "pattern": "a+"}}})


def test_next_turn_reuses_the_cached_prefix(client, url, tiny_engine):
    """The follow-up turn of a chat prefills only what it adds (usage reports the cached
    tokens, /metrics counts them) and gets the text a fresh generation gets."""
    first = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12,
                                           temperature=0)
    turn = [*MESSAGES, {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "Shorter"}]
    second = client.chat.completions.create(model="tiny", messages=turn, max_tokens=16,
                                            temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    tiny_engine.reset()
    assert second.choices[0].message.content == want(tiny_engine, turn, n=16).text
    reused = [line for line in httpx.get(f"{url}/metrics").text.splitlines()
              if line.startswith("edgert_prompt_tokens_reused_total ")]
    assert reused and int(reused[0].split()[1]) >= first.usage.prompt_tokens


def test_models_health_metrics(client, url):
    assert [m.id for m in client.models.list().data]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    text = httpx.get(f"{url}/metrics").text
    assert 'edgert_requests_total{endpoint="chat"}' in text and "edgert_slots_busy 0" in text


def test_concurrent_clients_each_get_their_own_text(url, tiny_engine):
    prompts = ["Explain lists", "Name a colour", "Count to five", "Say hello",
               "What is rain?", "Tell a joke", "Describe a cat", "Why is the sky blue?"]
    got = {}

    def ask(prompt):
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        got[prompt] = c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=20,
            temperature=0).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for prompt in prompts:
        assert got[prompt] == tiny_engine.generate(prompt, max_new_tokens=20).text, prompt


@pytest.mark.parametrize("body, status, code", [
    ({"messages": MESSAGES, "temperature": 5}, 400, None),
    ({"messages": MESSAGES, "n": 2}, 400, None),
    ({"messages": []}, 400, None),
    ({"messages": MESSAGES, "response_format": {"type": "json_object"}}, 400, None),
    ({"messages": MESSAGES, "max_tokens": 10 ** 6}, 400, "context_length_exceeded"),
])
def test_bad_requests_get_openai_errors(url, body, status, code):
    reply = httpx.post(f"{url}/v1/chat/completions", json=body)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    assert error["code"] == code


def test_malformed_json_is_400(url):
    reply = httpx.post(f"{url}/v1/chat/completions", content=b"{not json",
                       headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]


def test_api_key(tiny_artifact):
    with running(make_service(tiny_artifact, api_key="secret")) as base:
        wait_ready(base)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong",
                          max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{base}/v1", api_key="secret", max_retries=0)
        assert good.chat.completions.create(model="t", messages=MESSAGES, max_tokens=4,
                                            temperature=0).choices[0].message.content is not None


def test_503_while_loading(tiny_artifact):
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return edgert.load(tiny_artifact)

    with running(Service(slow_load, ServeOptions(model="tiny"))) as base:
        assert httpx.get(f"{base}/health").status_code == 503
        reply = httpx.post(f"{base}/v1/chat/completions", json={"messages": MESSAGES})
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "model_loading"
        release.set()
        wait_ready(base)


def _open_stream(base: str, max_tokens: int = 600):
    """A streaming request held open after its first chunk (the line iterator is returned:
    dropping it would close the response)."""
    client = httpx.Client(timeout=60)
    response = client.send(client.build_request(
        "POST", f"{base}/v1/chat/completions",
        json={"messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0,
              "stream": True}), stream=True)
    lines = response.iter_lines()
    assert next(lines).startswith("data: ")
    return client, response, lines


def slow_engine(path):
    """An engine whose streams take 200 ms a piece: a generation that is still running when
    the next request arrives."""
    engine = edgert.load(path)
    stream = engine.stream

    def slow(*args, **kwargs):
        for piece in stream(*args, **kwargs):
            time.sleep(0.2)
            yield piece

    engine.stream = slow
    return engine


def wait_for_a_free_slot(base: str, seconds: float = 3) -> None:
    """A small request until it is served (200) rather than refused (429): the slot a
    departed client held comes free well before its generation would have ended."""
    deadline = time.time() + seconds
    while True:
        reply = httpx.post(f"{base}/v1/chat/completions",
                           json={"messages": MESSAGES, "max_tokens": 2, "temperature": 0})
        if reply.status_code == 200:
            return
        assert reply.status_code == 429 and time.time() < deadline
        time.sleep(0.1)


def test_full_queue_is_429_and_a_disconnect_frees_the_slot(tiny_artifact):
    service = Service(lambda: slow_engine(tiny_artifact), ServeOptions(model="t", max_queue=0))
    with running(service) as base:
        wait_ready(base)
        client, response, lines = _open_stream(base)
        busy = httpx.post(f"{base}/v1/chat/completions",
                          json={"messages": MESSAGES, "max_tokens": 4})
        assert busy.status_code == 429 and busy.json()["error"]["code"] == "queue_full"
        assert next(lines) is not None
        response.close()  # the client goes away mid-stream
        client.close()
        # the abandoned generation had seconds left (200 ms a token)
        wait_for_a_free_slot(base)
        assert "edgert_slots_busy 0" in httpx.get(f"{base}/metrics").text


def test_parallel_slots_full_is_429_and_a_disconnect_frees_a_slot(tiny_artifact):
    """Two slots, no queue: two open streams fill them, a third request is 429; when one
    client leaves, its slot frees at once (steps slowed to 200 ms so nothing ends by itself)."""
    service = Service(lambda: edgert.load(tiny_artifact),
                      ServeOptions(model="t", max_queue=0, parallel=2))
    with running(service) as base:
        wait_ready(base)
        step = service.worker.decoder.step

        def slow_step():
            time.sleep(0.2)
            return step()

        service.worker.decoder.step = slow_step
        first = _open_stream(base, max_tokens=300)  # two fit the 768-token cache together
        second = _open_stream(base, max_tokens=300)
        busy = httpx.post(f"{base}/v1/chat/completions",
                          json={"messages": MESSAGES, "max_tokens": 4})
        assert busy.status_code == 429
        deadline = time.time() + 3  # the second joins at the worker's next step
        while "edgert_slots_busy 2" not in httpx.get(f"{base}/metrics").text:
            assert time.time() < deadline, "the second stream never got a slot"
            time.sleep(0.05)
        client, response, _ = first
        response.close()
        client.close()
        wait_for_a_free_slot(base)
        second[1].close()
        second[0].close()


def test_parallel_needs_a_batching_backend(tiny_artifact):
    service = Service(lambda: edgert.load(tiny_artifact, backend="ort"),
                      ServeOptions(model="t", parallel=2))
    deadline = time.time() + 30
    while service.engine is None and service.load_error is None:
        assert time.time() < deadline
        time.sleep(0.05)
    assert service.worker is not None and service.load_error is None
    with pytest.raises(edgert.EdgertError, match="positive integer"):
        make_service(tiny_artifact, parallel=0)


def test_interleaved_streams_in_one_thread_are_refused(tiny_engine):
    first = tiny_engine.stream("Explain lists", max_new_tokens=8)
    next(first)
    second = tiny_engine.stream("Name a colour", max_new_tokens=8)
    with pytest.raises(edgert.GenerationError, match="unfinished stream"):
        next(second)
    first.close()
    assert "".join(tiny_engine.stream("Name a colour", max_new_tokens=8))
