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


def test_wing_commands_come_from_entry_points():
    from open_clip_cxr.commands import OWN, registered
    found = registered()
    assert {"train-text", "train-clip", "demo", "convert", "export", "push"} <= set(found)
    assert not set(found) & set(OWN)
    assert list(cli.COMMANDS)[:3] == ["shards", "train-text", "train-clip"]   # data flows top to bottom


def test_a_third_party_command_registers_through_an_entry_point(monkeypatch, capsys, tmp_path):
    import sys
    from importlib.metadata import EntryPoint
    from open_clip_cxr import commands
    plugin = tmp_path / "cxr_plugin_cmd.py"
    plugin.write_text("from open_clip_cxr.commands import Command\n"
                      "HELLO = Command('cxr_plugin_cmd', 'say hello from a plugin', 5)\n"
                      "def add_arguments(p):\n    p.add_argument('--who', default='world')\n"
                      "def run(args):\n    print('hello', args.who)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [EntryPoint("hello", "cxr_plugin_cmd:HELLO", commands.ENTRY_POINT_GROUP),
           EntryPoint("broken", "no_such_module_xyz:X", commands.ENTRY_POINT_GROUP),
           EntryPoint("eval", "cxr_plugin_cmd:HELLO", commands.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(commands, "entry_points", lambda group: eps if group == commands.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(cli, "COMMANDS", cli._Commands())
    assert cli.main(["hello", "--who", "plugins"]) == 0
    out, err = capsys.readouterr()
    assert "hello plugins" in out
    assert "'broken'" in err and "did not load" in err and "'eval'" in err and "built-in" in err
    assert list(cli.COMMANDS)[0] == "hello" and cli.COMMANDS["eval"].module == "open_clip_cxr.eval.cli"
    sys.modules.pop("cxr_plugin_cmd", None)
