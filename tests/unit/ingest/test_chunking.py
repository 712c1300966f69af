from services.ingest.chunking import Chunker


def test_short_text_is_one_chunk(tokenizer):
    chunks = Chunker(tokenizer, 50, 8).chunk("A short sentence.")
    assert [c.text for c in chunks] == ["A short sentence."]
    assert chunks[0].token_start == 0


def test_chunks_respect_the_token_limit_and_overlap(tokenizer):
    text = " ".join(f"Sentence number {i} talks about topic {i % 7}." for i in range(120))
    chunker = Chunker(tokenizer, 64, 16)
    chunks = chunker.chunk(text)
    assert len(chunks) > 5
    for c in chunks:
        assert c.token_end - c.token_start <= 64
        assert len(tokenizer.encode(c.text, add_special_tokens=False).ids) <= 64 + 2
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert b.token_start == a.token_end - 16  # overlap of exactly 16 tokens
    assert chunks[-1].token_end == len(tokenizer.encode(text, add_special_tokens=False).ids)


def test_chunks_end_at_sentence_boundaries_when_possible(tokenizer):
    text = " ".join(f"This is sentence {i} of the document." for i in range(60))
    for c in Chunker(tokenizer, 48, 8).chunk(text)[:-1]:
        assert c.text.endswith(".")


def test_every_word_is_in_some_chunk(tokenizer):
    words = [f"w{i}x" for i in range(500)]
    chunks = Chunker(tokenizer, 40, 5).chunk(" ".join(words))
    joined = " ".join(c.text for c in chunks)
    assert all(w in joined for w in words)


def test_empty_text_has_no_chunks(tokenizer):
    assert Chunker(tokenizer, 40, 5).chunk("") == []
