"""Medusa-1 self-distillation data: the backbone's own responses and its own argmax targets.

1. Responses: the frozen backbone answers the shipped prompt set (half greedy, half sampled),
   batched with left padding (much cheaper per token than one-at-a-time decoding).
   With ``--data FILE`` the given texts are used instead.
2. One teacher-forced forward per sequence gives the final-norm hidden state h_t and the
   backbone's argmax a_t (its prediction of token t+1) at every position.
3. Head i at position t is trained towards a_{t+i+1}, the backbone's own prediction of token
   t+i+2: on a greedy response that is exactly the token that follows; on a sampled or given
   text it is what greedy decoding would produce from that prefix.

Only response positions (from the last prompt token on) are kept: that is where heads run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from edgert.errors import ConfigError
from edgert.model.config import DecoderConfig
from edgert.model.loaded import LoadedModel

IGNORE = -100


@dataclass(frozen=True)
class DistillOptions:
    max_new_tokens: int = 256
    batch_size: int = 16
    sampled_share: float = 0.5  # share of prompts answered by sampling instead of greedy
    temperature: float = 0.7
    top_p: float = 0.9
    max_prompt_tokens: int = 320
    seed: int = 0


@dataclass
class DistillData:
    """Training examples: hidden [N, H] float32, targets [N, K] int64 (IGNORE where absent),
    roots [N] int64: a_t, the backbone's own next token at t (the tree root at run time)."""

    hidden: torch.Tensor
    targets: torch.Tensor
    sequences: int
    roots: torch.Tensor | None = None  # None in data cached before roots were recorded

    def save(self, path: Path) -> None:
        torch.save({"hidden": self.hidden, "targets": self.targets, "roots": self.roots,
                    "sequences": self.sequences}, path)

    @classmethod
    def load(cls, path: Path) -> DistillData:
        data = torch.load(path, weights_only=True)
        return cls(data["hidden"], data["targets"], int(data["sequences"]), data.get("roots"))


def build_hf_model(loaded: LoadedModel):
    """A transformers Llama with the loaded weights (batched generation + hidden states)."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    cfg = loaded.config
    llama_only = {"attention_bias", "attention_output_bias", "mlp_bias", "qk_norm",
                  "hidden_act", "norm_weight_offset", "sandwich_norms", "embedding_multiplier",
                  "query_scale", "attn_logit_softcapping", "final_logit_softcapping"}
    plain = DecoderConfig(**{k: v for k, v in cfg.to_dict().items() if k not in llama_only})
    if plain != cfg or cfg.rope_type == "frequency_factors":
        raise ConfigError(f"self-distillation runs the backbone as a transformers Llama; a "
                          f"{loaded.architecture} model's layers differ from it (train heads "
                          "for Llama-family models, or Mistral)")
    hf_config = HFConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=False, mlp_bias=False)
    model = LlamaForCausalLM(hf_config)
    state = dict(loaded.state_dict)
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=False)
    return model.eval().requires_grad_(False)


class PromptEncoder:
    def __init__(self, loaded: LoadedModel) -> None:
        from tokenizers import Tokenizer

        from edgert.runtime.tokenizer import ChatTemplate

        bundle = loaded.tokenizer
        self.tok = Tokenizer.from_str(bundle.tokenizer_json)
        self.template = (ChatTemplate(bundle.chat_template, bundle.bos_token, bundle.eos_token)
                         if bundle.chat_template else None)
        self.eos = list(loaded.config.eos_token_id) or [0]

    def chat(self, prompt: str, response: str | None = None) -> tuple[list[int], list[int]]:
        if self.template is None:
            ids = self.tok.encode(prompt).ids
        else:
            text = self.template.render([{"role": "user", "content": prompt}])
            ids = self.tok.encode(text, add_special_tokens=False).ids
        answer = self.tok.encode(response, add_special_tokens=False).ids if response else []
        return ids, answer


def generate_responses(model, encoder: PromptEncoder, prompts: list[str],
                       options: DistillOptions, progress: Callable[[int], None] = lambda n: None
                       ) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, response_ids) per prompt, batched with left padding, seeded."""
    pad = encoder.eos[0]
    out: list[tuple[list[int], list[int]]] = []
    n_sampled = int(round(len(prompts) * options.sampled_share))
    for start in range(0, len(prompts), options.batch_size):
        batch = prompts[start:start + options.batch_size]
        encoded = [encoder.chat(p)[0][-options.max_prompt_tokens:] for p in batch]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded])
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
        sample = start >= len(prompts) - n_sampled
        torch.manual_seed(options.seed * 1000 + start)
        with torch.no_grad():
            generated = model.generate(
                input_ids=input_ids, attention_mask=attention,
                max_new_tokens=options.max_new_tokens, do_sample=sample,
                temperature=options.temperature if sample else None,
                top_p=options.top_p if sample else None, top_k=None,
                eos_token_id=encoder.eos, pad_token_id=pad)
        for ids, row in zip(encoded, generated[:, width:].tolist()):
            response = []
            for token in row:
                response.append(token)
                if token in encoder.eos:
                    break
            out.append((ids, response))
        progress(len(batch))
    return out


def read_data_file(path: Path, encoder: PromptEncoder) -> list[tuple[list[int], list[int]]]:
    """JSONL: {"prompt", "response"} (chat-formatted) or {"text"} (raw, all positions used)."""
    pairs = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"{path}:{n} is not JSON; each line needs {{\"prompt\", "
                              "\"response\"}} or {\"text\"}") from None
        if "text" in record:
            ids = encoder.tok.encode(record["text"]).ids
            pairs.append((ids[:1], ids[1:]))
        elif "prompt" in record and "response" in record:
            pairs.append(encoder.chat(record["prompt"], record["response"]))
        else:
            raise ConfigError(f"{path}:{n} needs 'prompt' and 'response', or 'text'")
    if not pairs:
        raise ConfigError(f"{path} has no examples")
    return pairs


def padded_states(model, seqs: list[list[int]], layers: tuple[int, ...] = ()) -> torch.Tensor:
    """One teacher-forced forward of ``model`` over ``seqs`` (padded on the right): the
    final-norm hidden states [B, T, H] (rows past a sequence's end are padding), then the
    residual stream after each of ``layers`` ([B, T, (1 + len(layers))H])."""
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        out = model.model(input_ids=ids, attention_mask=mask, output_hidden_states=bool(layers))
    if not layers:
        return out.last_hidden_state
    return torch.cat([out.last_hidden_state, *(out.hidden_states[k] for k in layers)], dim=-1)


def argmax_tokens(hidden: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
    """The backbone's argmax after each hidden state [T, H] (lm_head [V, H]), in chunks."""
    with torch.no_grad():
        return torch.cat([torch.matmul(chunk, lm_head.t()).argmax(-1)
                          for chunk in hidden.split(256)])


def hidden_and_targets(model, pairs: list[tuple[list[int], list[int]]], num_heads: int,
                       batch_size: int = 8, progress: Callable[[int], None] = lambda n: None
                       ) -> DistillData:
    """Teacher-forced forward over each prompt+response; keep response positions."""
    hidden_rows, target_rows, root_rows = [], [], []
    lm_head = model.lm_head.weight  # [V, H]
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        seqs = [p + r for p, r in batch]
        states = padded_states(model, seqs)
        for row, ((prompt, _), seq) in enumerate(zip(batch, seqs)):
            length = len(seq)
            h = states[row, :length]
            argmax = argmax_tokens(h, lm_head)  # a_t for every t
            first = len(prompt) - 1  # heads run from the last prompt token on
            positions = torch.arange(first, length)
            targets = torch.full((len(positions), num_heads), IGNORE, dtype=torch.int64)
            for i in range(num_heads):
                src = positions + i + 1
                valid = src < length
                targets[valid, i] = argmax[src[valid]]
            keep = targets[:, 0] != IGNORE
            hidden_rows.append(h[positions[keep]].clone())
            target_rows.append(targets[keep])
            root_rows.append(argmax[positions[keep]])
        progress(len(batch))
    return DistillData(torch.cat(hidden_rows), torch.cat(target_rows), len(pairs),
                       torch.cat(root_rows))
