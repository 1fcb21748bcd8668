"""Prompt tokenization for pi0 / pi0.5: the PaliGemma SentencePiece model, or a byte fallback for the tiny demo."""

from __future__ import annotations

import logging
import os
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

Kind = Literal["pi0", "pi05"]
KINDS = ("pi0", "pi05")
# Whose rules write the prompt: openpi's PaligemmaTokenizer, or LeRobot's processors (0.4) before its tokenizer.
PROMPT_FORMATS = ("openpi", "lerobot")
DEFAULT_MAX_LEN = {"pi0": 48, "pi05": 200}
STATE_BINS = 256


def clean_prompt(text: str) -> str:
    """openpi's prompt cleaning: strip, underscores and newlines become spaces."""
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a str, got {type(text).__name__}")
    return text.strip().replace("_", " ").replace("\n", " ")


def discretize_state(state: np.ndarray) -> np.ndarray:
    """Normalized state ([-1, 1]) -> bin indices in 0..255, exactly as openpi does it.

    Like openpi there is no clipping: a value below -1 gives -1 and a value at or above 1 gives 255
    (quantile-normalized training data lies outside [-1, 1] about 2% of the time, so the model has seen both).
    """
    state = np.asarray(state, dtype=np.float64)
    if state.ndim != 1:
        raise ValueError(f"state must be a 1-D vector, got shape {state.shape}")
    bad = np.flatnonzero(~np.isfinite(state))
    if bad.size:
        raise ValueError(f"state has NaN/inf at indices {bad.tolist()}")
    return np.digitize(state, bins=np.linspace(-1.0, 1.0, STATE_BINS + 1)[:-1]) - 1


def pi05_prompt(prompt: str, state: np.ndarray) -> str:
    """The pi0.5 text prefix: task and discretized normalized state, ending where the actions begin."""
    state_str = " ".join(str(int(v)) for v in discretize_state(state))
    return f"Task: {clean_prompt(prompt)}, State: {state_str};\nAction: "


class _PromptTokenizerBase:
    """Shared pi0 / pi0.5 prompt layout; subclasses supply `_encode(text, add_bos)`, `decode_ids` and `pad_id`.

    prompt_format "openpi": pi0 encodes the cleaned task, then "\n" separately; pi0.5 discretizes the state as
    given (unpadded). "lerobot": pi0 encodes the raw task with "\n" appended as one string (Pi0NewLineProcessor,
    then the tokenizer, which adds BOS); pi0.5 zero-pads the normalized state to `state_pad` dims first
    (Pi05PrepareStateTokenizerProcessorStep pads to max_state_dim before discretizing).
    """

    vocab_size: int
    bos_id: int
    pad_id: int

    def __init__(self, max_len: int | None, kind: Kind, prompt_format: str = "openpi", state_pad: int | None = None):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
        self.prompt_format = prompt_format
        self.state_pad = 32 if state_pad is None else int(state_pad)  # LeRobot's default max_state_dim
        max_len = DEFAULT_MAX_LEN[kind] if max_len is None else int(max_len)
        if max_len < 2:
            raise ValueError(f"max_len must be at least 2 (BOS + one token), got {max_len}")
        self.kind = kind
        self.max_len = max_len
        self._warned_truncation = False

    def token_ids(self, prompt: str, state: np.ndarray | None = None) -> list[int]:
        """Unpadded token ids. pi0.5 needs the normalized (unpadded) state; pi0 ignores `state`."""
        if self.kind == "pi05":
            if state is None:
                raise ValueError("pi05 prompts include the normalized state; pass state=")
            if self.prompt_format == "lerobot":
                state = np.asarray(state, dtype=np.float64)
                state = np.concatenate([state, np.zeros(max(self.state_pad - state.size, 0))])
            return self._encode(pi05_prompt(prompt, state), add_bos=True)
        if self.prompt_format == "lerobot":
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
            return self._encode(prompt if prompt.endswith("\n") else prompt + "\n", add_bos=True)
        # openpi's pi0: "\n" is tokenized on its own as the start-of-answer token.
        return self._encode(clean_prompt(prompt), add_bos=True) + self._encode("\n", add_bos=False)

    def tokenize(self, prompt: str, state: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Prompt -> (tokens int32 (max_len,), mask bool (max_len,)), padded on the right, truncated if too long."""
        ids = self.token_ids(prompt, state)
        n = len(ids)
        if n > self.max_len:
            lost = "the 'Action: ' marker" if self.kind == "pi05" else "the closing newline"
            msg = f"prompt is {n} tokens, more than max_len={self.max_len}; truncating ({lost} is lost)"
            # The runner tokenizes at control rate; say it once loudly, then quietly.
            log.log(logging.DEBUG if self._warned_truncation else logging.WARNING, msg)
            self._warned_truncation = True
            ids, n = ids[: self.max_len], self.max_len
        tokens = np.full(self.max_len, self.pad_id, dtype=np.int32)
        tokens[:n] = ids
        mask = np.zeros(self.max_len, dtype=bool)
        mask[:n] = True
        return tokens, mask

    def decode(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> str:
        """Tokens (and optional mask) -> text, without BOS or padding."""
        tokens = np.asarray(tokens)
        if mask is not None:
            tokens = tokens[np.asarray(mask, dtype=bool)]
        ids = [int(t) for t in tokens]
        if ids and ids[0] == self.bos_id:
            ids = ids[1:]
        return self.decode_ids(ids)


class PromptTokenizer(_PromptTokenizerBase):
    """The PaliGemma SentencePiece model (e.g. openpi's paligemma_tokenizer.model) loaded from a file."""

    def __init__(self, path: str | os.PathLike, max_len: int | None = None, kind: Kind = "pi0",
                 vocab_size: int | None = None, prompt_format: str = "openpi", state_pad: int | None = None):
        import sentencepiece

        super().__init__(max_len, kind, prompt_format, state_pad)
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model not found: {path!r} (expected a SentencePiece .model file, "
                                    "e.g. PaliGemma's paligemma_tokenizer.model)")
        with open(path, "rb") as f:
            proto = f.read()
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        except RuntimeError as e:
            raise ValueError(f"{path!r} is not a SentencePiece model ({len(proto)} bytes could not be parsed)") from e
        if self.sp.vocab_size() == 0:  # an empty file parses as an empty model
            raise ValueError(f"{path!r} is not a SentencePiece model (no vocabulary; {len(proto)} bytes)")
        self.path = path
        self.vocab_size = int(self.sp.vocab_size())
        if vocab_size is not None and self.vocab_size > vocab_size:
            raise ValueError(f"tokenizer {path!r} has {self.vocab_size} tokens but the model's embedding has only "
                             f"{vocab_size}: wrong tokenizer for this model")
        self.bos_id = int(self.sp.bos_id())
        if self.bos_id < 0:
            raise ValueError(f"tokenizer {path!r} defines no BOS token; pi0 prompts start with BOS")
        # PaliGemma's pad id is 0, which is also what openpi pads with.
        self.pad_id = max(int(self.sp.pad_id()), 0)

    def _encode(self, text: str, add_bos: bool) -> list[int]:
        return list(self.sp.encode(text, add_bos=add_bos))

    def decode_ids(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class ByteTokenizer(_PromptTokenizerBase):
    """UTF-8 bytes + offset, for the tiny preset when no SentencePiece model is given. Same layout as PaliGemma.

    ids 0..3 are pad, eos, bos, unk (PaliGemma's order); byte b is id 4 + b. With a vocabulary smaller than
    260 the bytes are folded modulo the free ids (lossy: decode then refuses), which is enough for a demo.
    """

    OFFSET = 4
    PAD, EOS, BOS = 0, 1, 2

    def __init__(self, vocab_size: int, max_len: int | None = None, kind: Kind = "pi0", prompt_format: str = "openpi",
                 state_pad: int | None = None):
        super().__init__(max_len, kind, prompt_format, state_pad)
        vocab_size = int(vocab_size)
        if vocab_size <= self.OFFSET + 1:
            raise ValueError(f"ByteTokenizer needs vocab_size > {self.OFFSET + 1} (4 special ids + bytes), "
                             f"got {vocab_size}; use vocab_size >= {self.OFFSET + 256} for lossless bytes")
        self.vocab_size = vocab_size
        self.bos_id, self.pad_id = self.BOS, self.PAD
        self._span = min(256, vocab_size - self.OFFSET)
        self.lossless = self._span == 256
        if not self.lossless:
            log.info("ByteTokenizer: vocab_size %d < %d, folding bytes modulo %d (prompts are not decodable)",
                     vocab_size, self.OFFSET + 256, self._span)

    def _encode(self, text: str, add_bos: bool) -> list[int]:
        ids = [self.OFFSET + b % self._span for b in text.encode("utf-8")]
        return [self.BOS] + ids if add_bos else ids

    def decode_ids(self, ids: list[int]) -> str:
        if not self.lossless:
            raise ValueError(f"cannot decode: this ByteTokenizer folds bytes (vocab_size {self.vocab_size} "
                             f"< {self.OFFSET + 256})")
        out = bytearray()
        for i in ids:
            if i in (self.PAD, self.EOS, self.BOS):
                continue
            if not self.OFFSET <= i < self.OFFSET + 256:
                raise ValueError(f"token id {i} is not a byte token (expected {self.OFFSET}..{self.OFFSET + 255})")
            out.append(i - self.OFFSET)
        return out.decode("utf-8", errors="replace")


def load_tokenizer(path: str | os.PathLike | None, vocab_size: int, max_len: int | None = None,
                   kind: Kind = "pi0", prompt_format: str = "openpi",
                   state_pad: int | None = None) -> PromptTokenizer | ByteTokenizer:
    """The SentencePiece tokenizer at `path`, or the byte tokenizer (with a notice) when path is None."""
    if path is None:
        log.warning("no tokenizer model given: using the built-in byte tokenizer (fine for the tiny demo; "
                    "real pi0/pi0.5 checkpoints need PaliGemma's SentencePiece model)")
        return ByteTokenizer(vocab_size, max_len=max_len, kind=kind, prompt_format=prompt_format, state_pad=state_pad)
    return PromptTokenizer(path, max_len=max_len, kind=kind, vocab_size=vocab_size, prompt_format=prompt_format,
                           state_pad=state_pad)
