"""`kvgate bench soak` at a tiny scale: every request answered, one sample per chunk, a report."""

from __future__ import annotations

from kvbench.soak import Options, render, run


def test_a_tiny_soak_samples_every_chunk_and_reports() -> None:
    opts = Options(requests=300, chunk=100, concurrency=4, prompts=40)
    samples = run(opts)
    assert [s.sent for s in samples] == [100, 200, 300]
    assert all(s.errors == 0 and s.rss_mib > 10 and s.fds > 0 for s in samples)
    text = render(samples, opts)
    assert "| requests sent | elapsed s | RSS MiB | open fds | loop lag max ms | errors so far |" in text
    assert ("Flat: within the bounds." in text) != ("NOT flat" in text)
