"""
Overrides a script's settings, its commented module globals, from config files and --key=value arguments:

    python train.py config/tiny_cpu.py --batch_size=32 --compile=False
    python sample.py --chat                  # a bare --flag sets a boolean to True

A config file is plain Python assignments (config/*.py); later files and arguments win. Only keys the script
already defines can be set, and a value must have the default's type (an int is fine where a float is
expected; a None default takes anything). Anything else is a one-line error, and --help lists every key.
"""
import ast
import os
import re
import sys

SETTING_TYPES = (bool, int, float, str, tuple, list, type(None))


def _check(key, value, default, source):
    if default is None or value is None:
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not type(default):
        raise SystemExit(f'error: {source}: {key} must be {type(default).__name__} '
                         f'(default {default!r}), got {value!r}')
    return value


def _help(settings):
    path = settings.get('__file__', 'script')
    print(f'usage: python {os.path.basename(path)} [config/file.py ...] [--key=value ...]\n\nsettings:')
    comments = {}
    if os.path.exists(path):
        for line in open(path):
            m = re.match(r'^(\w+)\s*=.*?#\s*(.*)$', line)
            if m:
                comments[m.group(1)] = m.group(2)
    for key in settings['__configurable__']:
        print(f'  --{key}={settings[key]!r}' + (f'  # {comments[key]}' if key in comments else ''))
    raise SystemExit(0)


def configure(settings, argv=None):
    """Applies config files and --key=value arguments (default sys.argv[1:]) to settings, a script's
    globals(); returns the names of every configurable setting."""
    argv = sys.argv[1:] if argv is None else argv
    keys = [k for k, v in settings.items() if not k.startswith('_') and isinstance(v, SETTING_TYPES)]
    settings['__configurable__'] = keys
    for arg in argv:
        if arg in ('-h', '--help'):
            _help(settings)
        if not arg.startswith('--'):
            if not os.path.isfile(arg):
                raise SystemExit(f'error: config file {arg} not found')
            namespace = {}
            exec(compile(open(arg).read(), arg, 'exec'), namespace)
            for key, value in namespace.items():
                if key.startswith('_') or not isinstance(value, SETTING_TYPES):
                    continue  # imports, helpers
                if key not in keys:
                    raise SystemExit(f'error: {arg} sets unknown key {key!r}')
                settings[key] = _check(key, value, settings[key], arg)
            continue
        key, eq, raw = arg[2:].partition('=')
        if key not in keys:
            raise SystemExit(f'error: unknown key {key!r} (see --help)')
        if not eq:  # a bare --flag sets a boolean to True
            if not isinstance(settings[key], bool):
                raise SystemExit(f'error: expected --{key}=value, got {arg!r}')
            raw = 'True'
        if isinstance(settings[key], str):
            value = raw  # --device=cuda:1 or --start=123 stays a string
        else:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw
        settings[key] = _check(key, value, settings[key], arg)
    return keys
