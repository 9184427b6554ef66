"""`open-clip-cxr`: every subcommand has a working `--help` that explains it."""
import pytest

from open_clip_cxr import cli


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert f"open-clip-cxr {command}" in text and len(text.splitlines()) > 3


def test_no_command_prints_the_list(capsys):
    with pytest.raises(SystemExit):
        cli.main([])
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)
