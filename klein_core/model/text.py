"""Klein prompt embeddings: Qwen3 chat template, hidden states (9, 18, 27), stacked per token."""

from __future__ import annotations

import torch

from ..facts import TEXT_ENCODER_LAYERS, TEXT_TOKENS


def klein_chat_text(prompt: str) -> str:
    """The single-turn Qwen3 chat text with thinking disabled, exactly as the Klein pipeline renders it."""
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def text_tokens(tokenizer) -> int:
    """How many text tokens a prompt is padded to: Klein's 512, or fewer when the tokenizer's ``model_max_length``
    says so. Real Qwen3 tokenizers allow far more than 512; only the pre-trained tiny Klein (a model property, saved
    in its tokenizer config) is shorter, so that it trains on a CPU in minutes."""
    return min(TEXT_TOKENS, int(getattr(tokenizer, "model_max_length", TEXT_TOKENS)))


@torch.no_grad()
def encode_prompts(
    text_encoder,
    tokenizer,
    prompts: list[str],
    layers: tuple[int, ...] = TEXT_ENCODER_LAYERS,
) -> torch.Tensor:
    """Return (B, L, 3*H) embeddings: per token ``[h9 | h18 | h27]``, all L padded tokens kept (L = 512 on Klein,
    see :func:`text_tokens`).

    Runs under ``no_grad``: cached embeddings must not hold a graph (a second backward would fail).
    """
    texts = [klein_chat_text(p) for p in prompts]
    batch = tokenizer(
        texts, padding="max_length", truncation=True, max_length=text_tokens(tokenizer), return_tensors="pt"
    )
    device = next(text_encoder.parameters()).device
    out = text_encoder(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        output_hidden_states=True,
        use_cache=False,
    )
    stacked = torch.stack([out.hidden_states[i] for i in layers], dim=1)  # (B, 3, L, H)
    b, n, length, hidden = stacked.shape
    return stacked.permute(0, 2, 1, 3).reshape(b, length, n * hidden)


def text_ids(batch: int, length: int = TEXT_TOKENS, device="cpu") -> torch.Tensor:
    """Text position ids (0, 0, 0, l) for l = 0..L-1, shape (B, L, 4)."""
    zeros = torch.zeros(length, 3, dtype=torch.long, device=device)  # stacked, not written: runs on fake CUDA too
    ids = torch.cat([zeros, torch.arange(length, device=device).unsqueeze(1)], dim=1)
    return ids.unsqueeze(0).expand(batch, -1, -1)
