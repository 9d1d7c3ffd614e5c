"""How an ssh exec tells that its sandbox started, from its output alone (no host needed): the
line the sandbox writes before the command runs comes first on the standard output; it is taken
off, and the standard error is held back until it came. The host side is tested in
tests/multihost/test_ssh_sandbox_start.py."""

from __future__ import annotations

from providers.ssh.sandbox import START_LINE, ExecStart, split_start

_BWRAP = b"bwrap: Can't bind mount /oldroot/ on /newroot/: Unable to apply mount flags\n"


def _watch() -> tuple[ExecStart, list[tuple[str, bytes]]]:
    seen: list[tuple[str, bytes]] = []
    return ExecStart(lambda stream, chunk: seen.append((stream, chunk))), seen


def _joined(seen: list[tuple[str, bytes]], name: str) -> bytes:
    return b"".join(chunk for stream, chunk in seen if stream == name)


def test_the_line_is_taken_off_however_the_output_is_cut() -> None:
    output = START_LINE + b"out\n" + START_LINE + b"more\n"
    for cut in range(len(output) + 1):
        watch, seen = _watch()
        watch("stderr", b"early err\n")
        for part in (output[:cut], output[cut:]):
            if part:
                watch("stdout", part)
        watch("stderr", b"late err\n")
        assert watch.started
        # only the first line is the sandbox's: the command's own output keeps its lines
        assert _joined(seen, "stdout") == b"out\n" + START_LINE + b"more\n", cut
        assert _joined(seen, "stderr") == b"early err\nlate err\n"
    assert split_start(output) == (True, b"out\n" + START_LINE + b"more\n")


def test_without_the_line_nothing_is_passed_on_until_released() -> None:
    """A sandbox bwrap did not set up: its message is bwrap's, not the command's output."""
    watch, seen = _watch()
    watch("stderr", _BWRAP)
    assert not watch.started and seen == []
    assert split_start(b"") == (False, b"")
    watch.release()  # the command line's own exit (a missing program): its message is shown
    assert seen == [("stderr", _BWRAP)]


def test_a_line_after_something_a_login_script_printed_still_says_started() -> None:
    """Never taken for "not started" when the command ran: the line is looked for anywhere."""
    assert split_start(b"motd\n" + START_LINE + b"out\n") == (True, b"motd\nout\n")
    watch, seen = _watch()
    watch("stdout", b"motd\n")
    watch("stdout", START_LINE + b"out\n")
    assert watch.started and _joined(seen, "stdout") == b"motd\nout\n"


def test_a_line_that_only_ends_in_a_dot_is_no_start_line() -> None:
    """A login script's "Welcome." before a sandbox that did not start: not taken for the
    line (then the failure would read as the command's own), and left as it was."""
    assert split_start(b"Welcome.\n") == (False, b"Welcome.\n")
    assert split_start(b"Welcome.\n" + START_LINE + b"x.\n") == (True, b"Welcome.\nx.\n")
    watch, seen = _watch()
    watch("stdout", b"Welcome.\n")
    assert not watch.started and seen == []
