"""
Output folders written whole or not at all, and the small file helpers the scripts share.

Every script that writes a folder (prepare.py's dataset, train.py's export, export.py, merge.py, tasks.py) builds
it in a temporary sibling and swaps it into place in one step, so a reader, or a kill at any moment, sees either
the old folder or the new one, whole:

    with atomic_folder('out-merged') as tmp:
        ...write files into tmp...
"""
import ctypes
import ctypes.util
import hashlib
import os
import shutil
from contextlib import contextmanager

RENAME_EXCHANGE = 2  # renameat2's flag: swap two existing paths atomically (Linux >= 3.15)
AT_FDCWD = -100


def sha256(path):
    with open(path, 'rb') as f:
        return hashlib.file_digest(f, 'sha256').hexdigest()


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _exchange(a, b):
    """Swaps the paths a and b in one step where the kernel can (Linux's renameat2); False where it cannot."""
    libc = ctypes.CDLL(ctypes.util.find_library('c'), use_errno=True)
    if not hasattr(libc, 'renameat2'):
        return False
    return libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def replace_folder(tmp, final):
    """Moves the finished folder tmp to final, replacing what is there. Where the two cannot be swapped in one
    step, final goes to final.old first: a kill between the two renames leaves final.old, which the next
    atomic_folder(final) puts back."""
    if os.path.isdir(final) and _exchange(tmp, final):
        shutil.rmtree(tmp)  # the old folder, now
        return
    old = final + '.old'
    if os.path.exists(final):  # a folder can only be renamed onto a missing or empty one
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_text(path, text):
    """Writes a file whole (temp + rename): a kill leaves the old file or the new one."""
    tmp = f'{path}.tmp-{os.getpid()}'
    try:
        with open(tmp, 'w', encoding='utf-8') as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_folder(final):
    """Yields an empty temporary folder beside final; when the block ends without an error, the folder replaces
    final whole. On an error it is removed, and final is left as it was. The leftovers of a killed writer (their
    process gone) are removed first."""
    final = os.path.abspath(final)
    parent, name = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    if not os.path.exists(final) and os.path.isdir(final + '.old'):  # killed between replace_folder's renames
        os.replace(final + '.old', final)
    for entry in os.listdir(parent):
        pid = entry.removeprefix(f'.{name}.tmp-')
        if pid != entry and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    tmp = os.path.join(parent, f'.{name}.tmp-{os.getpid()}')
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, final)
