"""Peer engines for the benchmarks: transformers generate and onnxruntime-genai, on the same
weights as the edgert artifact and the same prompt ids, each run in a process of its own
(``run_in_own_process``; ``python -m bench.peers`` is the worker)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

PEERS_DIR = Path(__file__).resolve().parents[1] / "artifacts" / "peers"


def write_hf_dir(source: str, out: Path) -> Path:
    """The artifact's source model as a plain transformers directory (fp32 safetensors)."""
    from safetensors.torch import save_file

    from edgert.model.sources import load_model

    if (out / "config.json").is_file():
        return out
    loaded = load_model(source)
    cfg = loaded.config
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,  # explicit: older readers default it to 10000
        "rope_scaling": cfg.rope_scaling, "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu",
        "bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_id),
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in loaded.state_dict.items()}
    save_file(state, str(out / "model.safetensors"))
    (out / "tokenizer.json").write_text(loaded.tokenizer.tokenizer_json)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": loaded.tokenizer.bos_token, "eos_token": loaded.tokenizer.eos_token,
        "chat_template": loaded.tokenizer.chat_template,
        "model_max_length": cfg.max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_id)}))
    return out


class TransformersPeer:
    name = "transformers generate (fp32)"

    def __init__(self, manifest) -> None:
        from bench import common

        self.model = common.transformers_model_from_artifact(manifest)
        self.eos = manifest.tokenizer.eos_token_ids

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        with torch.no_grad():
            out = self.model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens,
                                      do_sample=False, eos_token_id=self.eos,
                                      pad_token_id=self.eos[0])
        return out[0, len(prompt_ids):].tolist()


class GenaiPeer:
    """onnxruntime-genai with its own builder's model (fp32 or int4, CPU)."""

    def __init__(self, manifest, precision: str = "fp32") -> None:
        import onnxruntime_genai as og

        source = manifest.source.get("registered_name") or manifest.source["path"]
        out = self.build(source, precision)
        self.name = f"onnxruntime-genai {precision}"
        self.og = og
        self.model = og.Model(str(out))
        self.eos = set(manifest.tokenizer.eos_token_ids)

    @staticmethod
    def build(source: str, precision: str) -> Path:
        """The builder's model of ``source``'s weights (written once under artifacts/peers;
        its defaults: int4 is block 32, accuracy level 4)."""
        hf_dir = write_hf_dir(source, PEERS_DIR / "hf")
        out = PEERS_DIR / f"ort-genai-{precision}"
        if not (out / "genai_config.json").is_file():
            t0 = time.time()
            subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder",
                            "-i", str(hf_dir), "-o", str(out), "-p", precision, "-e", "cpu"],
                           check=True, capture_output=True)
            print(f"built onnxruntime-genai {precision} model in {time.time() - t0:.0f} s",
                  file=sys.stderr)
        return out

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt_ids) + max_new_tokens, do_sample=False)
        generator = og.Generator(self.model, params)
        generator.append_tokens(prompt_ids)
        out: list[int] = []
        while not generator.is_done() and len(out) < max_new_tokens:
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            out.append(token)
            if token in self.eos:
                break
        return out


PEERS = {"transformers": TransformersPeer, "genai": GenaiPeer}


def run_peer(peer, prompt_ids: list[list[int]], new_tokens: int, runs: int):
    """(median tokens/s, outputs of the last run) of ``peer`` on the prompt ids."""
    from bench import common

    per_run, outs = [], []
    for _ in range(runs):
        tokens, elapsed, outs = 0, 0.0, []
        for ids in prompt_ids:
            t0 = time.perf_counter()
            out = peer.generate(ids, new_tokens)
            elapsed += time.perf_counter() - t0
            tokens += len(out)
            outs.append(out)
        per_run.append(tokens / elapsed)
    return common.median(per_run), outs


def run_in_own_process(artifact: Path, name: str, prompt_ids: list[list[int]],
                       new_tokens: int, runs: int) -> dict:
    """Peer ``name`` on the prompt ids in a process of its own (``python -m bench.peers``):
    {"engine", "tokens_per_s", "outputs"}. A runtime sharing a process with another, or
    beside another's idle spinning threads, runs slower: the caller closes its own engine
    first. Raises with the worker's last error line when it fails."""
    import tempfile

    from bench import common

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompt_ids, f)
    try:
        proc = common.run_module("peers", str(Path(artifact).resolve()), name, f.name,
                                 str(new_tokens), str(runs))
    finally:
        Path(f.name).unlink()
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    """``python -m bench.peers ARTIFACT NAME IDS_JSON NEW_TOKENS RUNS``: one peer, one
    process; prints {"engine", "tokens_per_s", "outputs"} as its last line."""
    from edgert.artifact.io import load_manifest

    artifact, name, ids_file, new_tokens, runs = sys.argv[1:6]
    peer = PEERS[name](load_manifest(Path(artifact), verify=False))
    rate, outs = run_peer(peer, json.loads(Path(ids_file).read_text()), int(new_tokens),
                          int(runs))
    print(json.dumps({"engine": peer.name, "tokens_per_s": rate, "outputs": outs}))


if __name__ == "__main__":
    main()
