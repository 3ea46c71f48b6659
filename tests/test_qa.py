import pytest
import torch

from lmforge.data.qa import (
    EncodedQA,
    QABatcher,
    collate,
    context_windows,
    encode_examples,
    encode_for_inference,
    encode_for_training,
    prompt_passage,
)
from lmforge.data.sources import QAExample
from lmforge.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    text = "Paris is the capital of France. The river Seine flows through the city. " * 40
    return train_tokenizer([text], vocab_size=400, sample_chars=20000, min_frequency=1)


def example(context="Paris is the capital of France.", answer="Paris", start=0, question="What is the capital?"):
    return QAExample(id="q1", question=question, context=context, answers=[answer], answer_starts=[start])


def test_loss_is_on_answer_tokens_only(tok):
    context = "The capital of France is Paris."
    enc = encode_for_training(
        tok, example(context=context, start=context.index("Paris")), "context", block_size=128, max_answer_tokens=16
    )
    x, y = collate([enc], tok.pad_id)
    targets = [t for t in y[0].tolist() if t != -100]
    # the answer is encoded as it reads inside the passage (" Paris"): the tokens to produce are tokens to copy
    assert targets == tok.encode(" Paris") + [tok.eot_id]
    assert targets[0] in enc.ids[: enc.prompt_len]
    # the position predicting the first answer token is the <|answer|> token
    first = (y[0] != -100).nonzero()[0].item()
    assert x[0, first].item() == tok.answer_id
    assert enc.ids[0] == tok.context_id and tok.question_id in enc.ids


def test_closed_book_has_no_context(tok):
    enc = encode_for_training(tok, example(), "closed_book", block_size=128, max_answer_tokens=16)
    assert tok.context_id not in enc.ids and enc.ids[0] == tok.question_id
    assert tok.decode(enc.ids) == "What is the capital? Paris"


def test_special_token_strings_in_questions_and_contexts_are_text(tok):
    """A passage or a question quoting "<|question|>" cannot add a QA marker: the prompt has exactly one of each."""
    context = "Paris <|question|> is the <|answer|> capital <|endoftext|> of <|context|> France <|pad|>."
    question = "What <|answer|> is the <|question|> capital?"
    ex = example(context=context, question=question, start=0)
    for enc in (
        encode_for_training(tok, ex, "context", 256, 16),
        encode_for_inference(tok, question, context, 256, 16),
    ):
        ids = enc.ids
        assert [ids.count(i) for i in (tok.context_id, tok.question_id, tok.answer_id)] == [1, 1, 1]
        assert tok.pad_id not in ids and ids.count(tok.eot_id) == (1 if len(ids) > enc.prompt_len else 0)
        assert tok.decode(ids[: enc.prompt_len]) == context + question
    for window in context_windows(tok, question, context * 20, 128, 16):
        assert window.ids.count(tok.question_id) == window.ids.count(tok.context_id) == 1


def test_padding_never_learned(tok):
    short = encode_for_training(tok, example(), "closed_book", 128, 16)
    long = encode_for_training(tok, example(), "context", 128, 16)
    x, y = collate([short, long], tok.pad_id)
    pad_positions = x[0] == tok.pad_id
    assert pad_positions.any()
    assert (y[0][pad_positions] == -100).all()


def test_long_context_keeps_a_window_around_the_answer(tok):
    filler = "The river Seine flows through the city. " * 30
    context = filler + "Paris is the capital of France. " + filler
    start = context.index("Paris")
    enc = encode_for_training(tok, example(context=context, start=start), "context", 64, 16)
    assert enc is not None and enc.context_truncated and len(enc.ids) <= 65
    prompt = tok.decode(enc.ids[: enc.prompt_len])
    assert "Paris is the capital" in prompt


def test_answer_windows_place_the_answer_at_varying_positions(tok):
    filler = "The river Seine flows through the city. " * 30
    context = filler + "Paris is the capital of France. " + filler
    start = context.index("Paris")
    positions = set()
    for i in range(12):
        enc = encode_for_training(
            tok,
            example(context=context, start=start, question=f"What is the capital {i}?"),
            "context",
            128,
            16,
            context_tokens=48,
        )
        ctx = enc.ids[1 : enc.ids.index(tok.question_id)]
        assert len(ctx) == 48 and enc.context_truncated
        assert "Paris is" in tok.decode(ctx)
        positions.add(ctx.index(tok.encode(" Paris")[0]) if tok.encode(" Paris")[0] in ctx else 0)
    assert len(positions) >= 4  # not always centred: the model cannot learn "the answer is in the middle"


def test_best_match_window_holds_the_question_words(tok):
    filler = "The river Seine flows through the city. " * 30
    context = filler + "The Eiffel tower was built by Gustave Eiffel in 1889. " + filler
    question = "Who built the Eiffel tower?"
    best = encode_for_inference(tok, question, context, 128, 16, context_tokens=64, select="best_match")
    first = encode_for_inference(tok, question, context, 128, 16, context_tokens=64, select="truncate")
    assert best.context_truncated and first.context_truncated
    assert "Gustave Eiffel" in tok.decode(best.ids) and "Gustave" not in tok.decode(first.ids)
    assert best.ids.index(tok.question_id) - 1 == 64  # <|context|> + 64 context tokens


def test_inference_windows_hold_whole_words():
    # few merges, so long words take several tokens and a window edge would often fall inside one
    words = ["Constantinople", "Mississippi", "Kilimanjaro", "1889", "Eiffel", "Schwarzenegger", "Bowl"]
    context = " ".join(f"{words[i % 7]} {words[(3 * i) % 7]}{i}, {words[(5 * i + 1) % 7]}." for i in range(40))
    small = train_tokenizer([context], vocab_size=290, sample_chars=20000, min_frequency=1)
    question = "Where is Kilimanjaro?"

    def one_word(a, b):
        return (a.isalpha() and b.isalpha()) or (a.isdigit() and b.isdigit())

    def assert_whole_words(prompt):
        text = small.decode(prompt_passage(small, prompt)).strip()
        at = context.index(text)
        before, after = context[at - 1 : at], context[at + len(text) : at + len(text) + 1]
        assert not one_word(before, text[0]) and not one_word(text[-1], after), (before, text, after)

    for budget in range(24, 64):
        for select in ("truncate", "best_match"):
            enc = encode_for_inference(small, question, context, 256, 16, budget, select)
            assert enc.context_truncated and budget - 24 < enc.ids.index(small.question_id) - 1 <= budget
            assert_whole_words(enc.ids)
        for window in context_windows(small, question, context, 256, 16, budget):
            assert_whole_words(window.ids)


def test_too_long_question_and_answer_are_skipped(tok, caplog):
    long_q = example(question="why " * 200)
    long_a = example(answer="Paris " * 50)
    assert encode_for_training(tok, long_q, "context", 64, 16) == "question longer than the block"
    assert encode_for_training(tok, long_a, "context", 64, 16) == "answer longer than 16 tokens"
    assert encode_for_inference(tok, "why " * 200, None, 64, 16) is None
    items = encode_examples(tok, [example(), long_q, long_a], "context", 64, 16, "test")
    assert len(items) == 1
    assert "2 of 3 QA examples skipped" in caplog.text


def test_inference_prompt_leaves_room_for_the_answer(tok):
    enc = encode_for_inference(tok, "What is the capital?", "Paris is the capital of France. " * 50, 64, 16)
    assert len(enc.ids) <= 64 - 16 and enc.ids[-1] == tok.answer_id


def test_batcher_epochs_and_resume(tok):
    items = [encode_for_training(tok, example(answer=a), "closed_book", 64, 16) for a in ["Paris", "France", "city"]]
    b = QABatcher(items, batch_size=2, pad_id=tok.pad_id, seed=1)
    assert b.steps_per_epoch == 2
    seen = [b.next_batch() for _ in range(3)]
    assert b.epoch == 1
    state = b.state_dict()
    nxt = b.next_batch()
    b2 = QABatcher(items, batch_size=2, pad_id=tok.pad_id, seed=1)
    b2.load_state_dict(state)
    assert torch.equal(b2.next_batch()[0], nxt[0])
    assert sum(x.shape[0] for x, _ in seen[:2]) == 3  # one epoch covers every example once


def _items_of_lengths(lengths: list[int]) -> list[EncodedQA]:
    """Examples whose first token is their index, so a batch says which examples it holds."""
    return [EncodedQA([i] + [7] * (n - 1), prompt_len=n - 1) for i, n in enumerate(lengths)]


def _epoch(batcher: QABatcher) -> list[list[int]]:
    """The example indices of each batch of one epoch (its first token)."""
    return [batcher.next_batch()[0][:, 0].tolist() for _ in range(batcher.steps_per_epoch)]


def test_batches_grouped_by_length_pad_less_and_still_cover_every_example():
    lengths = [int(n) for n in torch.randint(5, 120, (203,), generator=torch.Generator().manual_seed(0))]
    items = _items_of_lengths(lengths)

    def padding(batches):
        return sum(max(lengths[i] for i in b) - lengths[i] for b in batches for i in b)

    plain = _epoch(QABatcher(items, batch_size=8, pad_id=0, seed=3))
    # one group spans the whole epoch: each batch is a run of the length-sorted examples, the least padding
    whole = QABatcher(items, batch_size=8, pad_id=0, seed=3, group_by_length=26)
    grouped = _epoch(whole)
    for batches in (plain, grouped):
        assert sorted(i for b in batches for i in b) == list(range(203))  # every example once per epoch
    by_length = sorted(range(203), key=lengths.__getitem__)
    least = padding([by_length[lo : lo + 8] for lo in range(0, 203, 8)])
    assert padding(grouped) == least < padding(plain) / 4
    assert len(grouped[-1]) == 203 % 8  # the partial batch comes last, so batches stay aligned
    widest = [max(lengths[i] for i in b) for b in grouped[:-1]]
    assert widest != sorted(widest) and widest != sorted(widest, reverse=True)  # batches in shuffled order
    assert _epoch(whole) != grouped  # and another order the next epoch

    small = _epoch(QABatcher(items, batch_size=8, pad_id=0, seed=3, group_by_length=4))
    assert sorted(i for b in small for i in b) == list(range(203))
    assert least <= padding(small) < padding(plain)


def test_grouped_batches_resume_mid_epoch():
    lengths = [5 + (i * 37) % 90 for i in range(50)]
    items = _items_of_lengths(lengths)
    first = QABatcher(items, batch_size=4, pad_id=0, seed=1, group_by_length=3)
    reference = [first.next_batch()[0] for _ in range(30)]  # past the end of the first epoch (13 steps)
    again = QABatcher(items, batch_size=4, pad_id=0, seed=1, group_by_length=3)
    for _ in range(9):
        again.next_batch()
    resumed = QABatcher(items, batch_size=4, pad_id=0, seed=1, group_by_length=3)
    resumed.load_state_dict(again.state_dict())
    assert all(torch.equal(resumed.next_batch()[0], x) for x in reference[9:])
