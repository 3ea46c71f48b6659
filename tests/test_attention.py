"""Word-level attention aggregation, checked on hand-computable tensors."""

from __future__ import annotations

import pytest
import torch

from lmforge.attention import (
    Word,
    discount_first_token,
    group_tokens,
    input_focus,
    log_scale,
    most_attended,
    normalize_rows,
    to_words,
    word_attention,
)
from lmforge.model import GPT, GPTConfig


def test_group_tokens_merges_subwords_and_attaches_whitespace():
    text = "Sarah's ball.\n It"
    # tokens: "Sar" "ah's" " ball" "." "\n" " It"  (byte-level BPE offsets include the leading space)
    offsets = [(0, 3), (3, 7), (7, 12), (12, 13), (13, 14), (14, 17)]
    words = group_tokens(text, offsets)
    assert [w.text for w in words] == ["Sarah's", "ball", ".", "It"]
    assert [w.tokens for w in words] == [[0, 1], [2], [3], [4, 5]]


def test_group_tokens_shows_words_sharing_a_token_as_one():
    text = "Hello), world... ok"
    # tokens: "H" "ell" "o" ")," " world" ".." "." " o" "k": "),"  and ".." each hold two words
    offsets = [(0, 1), (1, 4), (4, 5), (5, 7), (7, 13), (13, 15), (15, 16), (16, 18), (18, 19)]
    words = group_tokens(text, offsets)
    assert [w.text for w in words] == ["Hello", "),", "world", "..", ".", "ok"]
    assert [w.tokens for w in words] == [[0, 1, 2], [3], [4], [5], [6], [7, 8]]
    assert [(w.start, w.end) for w in words][1] == (5, 7)


def test_group_tokens_keeps_special_tokens_as_words():
    text = "<|question|>Who?"
    words = group_tokens(text, [(0, 12), (12, 15), (15, 16)])
    assert [w.text for w in words] == ["<|question|>", "Who", "?"]


def _words(groups: list[list[int]]) -> list[Word]:
    return [Word(f"w{i}", 0, 0, g) for i, g in enumerate(groups)]


def test_to_words_sums_keys_and_averages_queries():
    a = torch.tensor(
        [
            [1.0, 0.0, 0.0],
            [0.5, 0.5, 0.0],
            [0.2, 0.3, 0.5],
        ]
    )
    words = _words([[0], [1, 2]])  # word 1 = tokens 1 and 2
    w = to_words(a, words)
    # row 1 = mean of token rows 1 and 2; column 1 = sum of token columns 1 and 2
    expected = torch.tensor(
        [
            [1.0, 0.0],
            [(0.5 + 0.2) / 2, (0.5 + 0.8) / 2],
        ]
    )
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(w.sum(-1), torch.ones(2))  # rows stay distributions


def test_to_words_works_per_layer_and_head():
    a = torch.eye(3).expand(2, 4, 3, 3)  # (layers, heads, T, T)
    w = to_words(a, _words([[0, 1], [2]]))
    assert w.shape == (2, 4, 2, 2)
    torch.testing.assert_close(w[1, 3], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_discount_first_token_renormalises_without_the_sink():
    a = torch.tensor(
        [
            [1.0, 0.0, 0.0],
            [0.8, 0.2, 0.0],
            [0.6, 0.1, 0.3],
        ]
    )
    d = discount_first_token(a)
    torch.testing.assert_close(
        d,
        torch.tensor(
            [
                [0.0, 0.0, 0.0],  # the first query can only see the sink
                [0.0, 1.0, 0.0],
                [0.0, 0.25, 0.75],
            ]
        ),
    )


def test_log_scale_and_row_normalisation():
    x = torch.tensor([[0.0, 1.0], [0.25, 0.5]])
    lg = log_scale(x)
    assert lg[0, 0] == pytest.approx(0.0) and lg[0, 1] == pytest.approx(1.0)
    assert 0.5 < float(lg[1, 0]) < float(lg[1, 1]) < 1.0  # small values lifted, order kept
    torch.testing.assert_close(normalize_rows(x), torch.tensor([[0.0, 1.0], [0.5, 1.0]]))
    torch.testing.assert_close(normalize_rows(torch.zeros(1, 2)), torch.zeros(1, 2))


def test_most_attended_ignores_self_and_future():
    w = torch.tensor(
        [
            [1.0, 0.0, 0.0],
            [0.3, 0.7, 0.0],
            [0.1, 0.6, 0.3],
        ]
    )
    assert most_attended(w) == [None, 0, 1]
    assert most_attended(w, exclude_self=False) == [0, 1, 1]
    # the first token discounted: the second word has no attention left for another word
    assert most_attended(discount_first_token(w)) == [None, None, 1]


def test_input_focus_uses_the_rows_that_predicted_each_new_token():
    # 3 prompt tokens (words: [0], [1, 2]) + 2 generated tokens; layers=1, heads=1
    a = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0, 0.0],
            [0.5, 0.5, 0.0, 0.0, 0.0],
            [0.2, 0.2, 0.6, 0.0, 0.0],  # predicted new token 0
            [0.1, 0.3, 0.3, 0.3, 0.0],  # predicted new token 1
            [0.2, 0.2, 0.2, 0.2, 0.2],
        ]
    )[None, None]
    focus = input_focus(a, _words([[0], [1, 2]]), prompt_len=3, n_new=2)
    torch.testing.assert_close(focus[0, 0], torch.tensor([[0.2, 0.8], [0.1, 0.6]]))


def test_word_attention_on_a_real_model():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from lmforge.tokenizer import SPECIAL_TOKENS, Tokenizer

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab.setdefault(ch, len(vocab))
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(SPECIAL_TOKENS)
    tok = Tokenizer(hf)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=3, n_embd=24, block_size=64)).eval()
    text = "John ate. He slept."  # characters are tokens here, so words have several tokens
    wa = word_attention(model, tok, text)
    assert [w.text for w in wa.words] == ["John", "ate", ".", "He", "slept", "."]
    assert wa.per_head.shape == (2, 3, 6, 6) and wa.mean.shape == (2, 6, 6)
    torch.testing.assert_close(wa.mean.sum(-1), torch.ones(2, 6))
    assert torch.all(wa.mean.triu(1) == 0)  # causal: no attention to later words
    assert wa.top[0][0] is None and all(t is not None and t < i for i, t in enumerate(wa.top[0]) if i > 0)
    disc = word_attention(model, tok, text, discount_first=True, normalize=True)
    assert torch.all(disc.mean[:, 1:, :].amax(-1) == 1.0)
    with pytest.raises(ValueError, match="at most 5"):
        word_attention(model, tok, text, max_tokens=5)
