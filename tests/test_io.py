import stat

from lmforge.io import atomic_write_text


def test_atomic_writes_get_the_permissions_a_plain_write_gets(tmp_path):
    """Reports, exports and checkpoints are readable as any file the user writes (umask), not owner-only."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic_write_text(tmp_path / "atomic.txt", "x")
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "atomic.txt") == mode(plain)
