"""Prompt tokenizer: a SentencePiece model trained here, pi0 / pi0.5 layouts, byte fallback, bad files."""

import random

import numpy as np
import pytest

spm = pytest.importorskip("sentencepiece")

from pi_policy.model.tokenizer import (  # noqa: E402
    ByteTokenizer,
    PromptTokenizer,
    discretize_state,
    load_tokenizer,
    pi05_prompt,
)

WORDS = ("pick up the red green blue cube block place it in bowl open close drawer move left right arm "
         "gripper towel fold put on top of table").split()


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    """A small SentencePiece model with PaliGemma's special ids (pad 0, eos 1, bos 2, unk 3) and settings."""
    rng = random.Random(0)
    sents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) for _ in range(300)]
    states = [" ".join(str(rng.randint(-1, 255)) for _ in range(7)) for _ in range(100)]
    sents += [f"Task: {s}, State: {st};\nAction: " for s, st in zip(sents[:100], states, strict=True)]
    sents += ["pick_up the cube.", "A-Z a-z 0123456789 ,.;:!?"]
    path = tmp_path_factory.mktemp("spm") / "tiny.model"
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sents), model_writer=f, vocab_size=100, hard_vocab_limit=False,
            pad_id=0, eos_id=1, bos_id=2, unk_id=3, user_defined_symbols=["\n"],
            normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
            split_digits=True, character_coverage=1.0, minloglevel=2)
    return str(path)


def test_pi0_layout_bos_newline_padding(sp_path):
    tok = PromptTokenizer(sp_path, kind="pi0")
    sp = spm.SentencePieceProcessor(model_file=sp_path)
    tokens, mask = tok.tokenize("  pick_up the\nred cube ")
    assert tokens.shape == (48,) and tokens.dtype == np.int32
    assert mask.shape == (48,) and mask.dtype == bool
    expected = [sp.bos_id()] + sp.encode("pick up the red cube") + sp.encode("\n")
    n = len(expected)
    assert tokens[0] == sp.bos_id() == 2
    assert tokens[:n].tolist() == expected
    assert tokens[n - 1] == sp.piece_to_id("\n")
    assert mask[:n].all() and not mask[n:].any()
    assert (tokens[n:] == 0).all()
    assert tok.decode(tokens, mask) == "pick up the red cube\n"


def test_pi05_layout_and_round_trip(sp_path):
    tok = PromptTokenizer(sp_path, kind="pi05")
    assert tok.max_len == 200
    state = np.array([-1.0, -0.99, 0.0, 0.5, 0.999, 1.0, 1.5, -1.2])
    tokens, mask = tok.tokenize("open_the drawer", state)
    text = tok.decode(tokens, mask)
    assert text == "Task: open the drawer, State: 0 1 128 192 255 255 255 -1;\nAction: "
    assert tokens[0] == tok.bos_id
    assert mask.sum() == len(tok.sp.encode(text)) + 1
    with pytest.raises(ValueError, match="state"):
        tok.tokenize("open the drawer")


def test_discretize_matches_openpi_formula():
    x = np.random.default_rng(0).uniform(-1.3, 1.3, size=1000)
    ref = np.digitize(x, bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1
    np.testing.assert_array_equal(discretize_state(x), ref)
    # bin edges: width 2/256, bin k covers [-1 + k/128, -1 + (k+1)/128)
    assert discretize_state(np.array([-1.0, -1.0 + 1 / 128, 0.0, 1 - 1e-9])).tolist() == [0, 1, 128, 255]
    with pytest.raises(ValueError, match=r"indices \[1\]"):
        discretize_state(np.array([0.0, np.nan]))
    assert pi05_prompt("a_b", np.zeros(2)) == "Task: a b, State: 128 128;\nAction: "


def test_truncation_warns_and_fills_mask(sp_path, captured_log):
    tok = PromptTokenizer(sp_path, max_len=8, kind="pi0")
    long = " ".join(WORDS)
    full = tok.token_ids(long)
    assert len(full) > 8
    with captured_log("pi_policy.model.tokenizer") as log:
        tokens, mask = tok.tokenize(long)
    assert "truncating" in log.text
    assert tokens.tolist() == full[:8] and mask.all()


def test_exact_fit_is_not_truncated(sp_path, captured_log):
    tok = PromptTokenizer(sp_path, kind="pi0")
    n = len(tok.token_ids("pick up the cube"))
    tok = PromptTokenizer(sp_path, max_len=n, kind="pi0")
    with captured_log("pi_policy.model.tokenizer") as log:
        tokens, mask = tok.tokenize("pick up the cube")
    assert mask.all() and "truncating" not in log.text


def test_bad_paths_and_vocab(sp_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        PromptTokenizer(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"this is not a protobuf")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        PromptTokenizer(junk)
    junk.write_bytes(b"")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        PromptTokenizer(junk)
    with pytest.raises(ValueError, match="embedding has only 50"):
        load_tokenizer(sp_path, vocab_size=50, kind="pi0")
    assert isinstance(load_tokenizer(sp_path, vocab_size=257152, kind="pi0"), PromptTokenizer)
    with pytest.raises(ValueError, match="kind"):
        PromptTokenizer(sp_path, kind="pi1")


def test_byte_tokenizer_layout_and_round_trip():
    tok = load_tokenizer(None, vocab_size=300, max_len=32, kind="pi0")
    assert isinstance(tok, ByteTokenizer)
    tokens, mask = tok.tokenize("pick_up\n")
    assert tokens[0] == ByteTokenizer.BOS
    assert tokens[1] == ByteTokenizer.OFFSET + ord("p")
    n = 1 + len("pick up") + 1
    assert mask.sum() == n and (tokens[n:] == ByteTokenizer.PAD).all()
    assert tok.decode(tokens, mask) == "pick up\n"
    assert tokens.max() < 300
    t5 = ByteTokenizer(300, kind="pi05")
    tokens, mask = t5.tokenize("grasp", np.array([0.0, -1.0]))
    assert t5.decode(tokens, mask) == "Task: grasp, State: 128 0;\nAction: "


def test_byte_tokenizer_small_vocab_folds_or_errors():
    tok = ByteTokenizer(64, max_len=16)
    tokens, mask = tok.tokenize("\u00e9t\u00e9 ZZZ")
    assert tokens[mask].max() < 64 and tokens[mask].min() >= 0
    with pytest.raises(ValueError, match="cannot decode"):
        tok.decode(tokens, mask)
    with pytest.raises(ValueError, match="vocab_size"):
        ByteTokenizer(5)


@pytest.mark.parametrize("prompt", ["pick_up the red cube", "  place it in the bowl ", "open the drawer\n"])
def test_pi0_prompt_formats_token_for_token(sp_path, prompt):
    sp = spm.SentencePieceProcessor(model_file=sp_path)
    bos = sp.bos_id()
    # openpi (PaligemmaTokenizer.tokenize): strip, "_" and "\n" -> " ", BOS + text, then "\n" encoded on its own.
    openpi = [bos] + sp.encode(prompt.strip().replace("_", " ").replace("\n", " ")) + sp.encode("\n")
    # LeRobot (Pi0NewLineProcessor, then the tokenizer with its BOS): the task as given, "\n" appended unless there.
    lerobot = [bos] + sp.encode(prompt if prompt.endswith("\n") else prompt + "\n")
    assert PromptTokenizer(sp_path, kind="pi0").token_ids(prompt) == openpi
    tok = PromptTokenizer(sp_path, kind="pi0", prompt_format="lerobot")
    assert tok.token_ids(prompt) == lerobot
    assert tok.token_ids(prompt).count(sp.piece_to_id("\n")) == 1
    if prompt.removesuffix("\n") != prompt.strip().replace("_", " "):  # LeRobot's pi0 does not clean the task
        assert lerobot != openpi


def test_pi05_prompt_formats_token_for_token(sp_path):
    sp = spm.SentencePieceProcessor(model_file=sp_path)
    state = np.linspace(-0.95, 0.95, 14)

    def bins(x):
        return " ".join(str(int(b)) for b in np.digitize(x, bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1)

    # openpi discretizes the normalized state as it is; LeRobot (Pi05PrepareStateTokenizerProcessorStep) first
    # zero-pads it to max_state_dim (32): 18 more bins, each 128.
    for fmt, text_state in (("openpi", bins(state)), ("lerobot", bins(np.concatenate([state, np.zeros(18)])))):
        tok = PromptTokenizer(sp_path, kind="pi05", prompt_format=fmt)
        text = f"Task: open the drawer, State: {text_state};\nAction: "
        assert tok.token_ids(" open_the drawer", state) == [sp.bos_id()] + sp.encode(text), fmt
    assert bins(np.zeros(18)) == " ".join(["128"] * 18)
    short = PromptTokenizer(sp_path, kind="pi05", prompt_format="lerobot", state_pad=16)
    text = short.decode(np.array(short.token_ids("go", state)))
    assert text == f"Task: go, State: {bins(state)} 128 128;\nAction: "  # 14 -> 16 dims
    with pytest.raises(ValueError, match="prompt_format"):
        PromptTokenizer(sp_path, prompt_format="hf")
