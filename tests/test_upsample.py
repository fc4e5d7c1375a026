"""Prompt upsampling: the OpenAI-compatible backend against a real HTTP server on 127.0.0.1, and the
local seq2seq backend (train a few steps, save, load, generate)."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dalle3_fast.upsample import INSTRUCTION, LocalUpsampler, OpenAIUpsampler, main, world_caption_pairs

REVISED = ("A large red circle sits above a small blue square on a plain white background, drawn as flat "
           "clip art with crisp edges and bright saturated colours.")


class _ChatHandler(BaseHTTPRequestHandler):
    requests: list = []
    reply = REVISED

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        payload = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                   "choices": [{"index": 0, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": f'  "{type(self).reply}"\n'}}],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server():
    _ChatHandler.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ChatHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_backend_request_and_parsing(chat_server):
    up = OpenAIUpsampler(chat_server, "tiny-llm", "sk-test", max_retries=0)
    out = up.upsample(["a red circle above a blue square", "two stars"])
    assert out == [REVISED, REVISED]  # quotes and surrounding whitespace stripped
    assert len(_ChatHandler.requests) == 2  # one request per prompt
    req = _ChatHandler.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["auth"] == "Bearer sk-test"
    body = req["body"]
    assert body["model"] == "tiny-llm" and body["n"] == 1
    system, user = body["messages"]
    assert system == {"role": "system", "content": INSTRUCTION}
    assert "ONE description" in system["content"] and "between 15 and 80 words" in system["content"]
    assert "rewrite the whole description" in system["content"]
    assert user["role"] == "user" and "a red circle above a blue square" in user["content"]
    assert _ChatHandler.requests[1]["body"]["messages"][1]["content"].endswith("two stars")


def test_openai_backend_reads_env(chat_server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", chat_server)
    monkeypatch.setenv("DALLE3_UPSAMPLE_MODEL", "env-model")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert OpenAIUpsampler(max_retries=0).upsample(["a star"]) == [REVISED]
    assert _ChatHandler.requests[0]["body"]["model"] == "env-model"


def test_openai_backend_cli(chat_server, capsys):
    rc = main(["--prompt", "a star", "--backend", "openai", "--base-url", chat_server, "--model", "m",
               "--api-key", "k"])
    assert rc == 0 and capsys.readouterr().out.strip() == REVISED


def test_openai_backend_errors(monkeypatch):
    monkeypatch.delenv("DALLE3_UPSAMPLE_MODEL", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="DALLE3_UPSAMPLE_MODEL"):
        OpenAIUpsampler()
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        OpenAIUpsampler(model="gpt-4o")
    # nothing listens on this port: one clear RuntimeError, no hang
    up = OpenAIUpsampler("http://127.0.0.1:9/v1", "m", "k", timeout=2, max_retries=0)
    with pytest.raises(RuntimeError, match="upsampling endpoint"):
        up.upsample(["a star"])
    with pytest.raises(ValueError, match="list of strings"):
        up.upsample("a star")


def test_world_pairs_are_ssc_to_dsc():
    pairs = world_caption_pairs(0, 20)
    assert len(pairs) == 20
    for ssc, dsc in pairs:
        assert len(ssc.split()) < len(dsc.split())


def test_local_upsampler_trains_saves_and_loads(tmp_path):
    up = LocalUpsampler.train_on_world(steps=3, batch_size=4, pairs=100, d_model=32, progress=False)
    up.max_new_tokens = 12
    out = up.upsample(["A large red circle.", "An image of two small blue stars."])
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    up.save_pretrained(tmp_path / "up")
    assert (tmp_path / "up" / "model.safetensors").is_file()
    again = LocalUpsampler.from_pretrained(tmp_path / "up")
    assert again.max_new_tokens == 12 and again.tokenizer == up.tokenizer
    assert again.upsample(["A large red circle.", "An image of two small blue stars."]) == out
    assert again.upsample([]) == []


def test_clean_strips_labels_quotes_and_loops():
    from dalle3_fast.upsample import _clean

    assert _clean('Description: "A red star."') == "A red star."
    assert _clean("A large yellow star star star star star.") == "A large yellow star."
    assert _clean("two  two stars\n") == "two two stars"


def test_local_revision_must_keep_the_prompts_content_words():
    from dalle3_fast.upsample import keeps_content

    assert keeps_content("a red circle above a blue square",
                         "A large red circle sits above a small blue square on a white background.")
    assert not keeps_content("a red circle above a blue square", "A large star and a large yellow star.")
    assert not keeps_content("two green stars", "Two green crosses on a black background.")
