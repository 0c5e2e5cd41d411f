"""Reading a checkpoint file: a torch.save file or URL (`.pth`, `.bin`; weights_only=True), a
`.safetensors` file, a timm model folder (`local-dir:FOLDER`: timm's or Hugging Face's, or one
written by scripts/export.py), or a Hugging Face Hub model (`hf-hub:ORG/NAME[@REVISION]`)
through huggingface_hub's local cache.

A file that is not one is a `CheckpointError` (a ValueError) whose message is one line naming
it; the command line prints that line (train/checkpoints.py)."""
import hashlib
import os
import re
import zipfile
from urllib.parse import urlparse

import torch

from errors import first_line
from .hub import CONFIG, WEIGHT_FILES, read_safetensors_checkpoint, read_timm_folder, weights_file


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; str(e) is one line that names the file."""


def is_url(path: str) -> bool:
    return urlparse(str(path)).scheme in ('http', 'https', 'file', 'ftp')


# DeiT's published checkpoints end in the first 8 hex digits of their sha256
# (deit_small_patch16_224-cd65a155.pth); torch.hub's own pattern also matches names like
# 'run-2.pth', so ours asks for at least 8 hex digits right before the extension
HASH_SUFFIX = re.compile(r'-([0-9a-f]{8,64})\.[A-Za-z0-9]+$')


def cached_download(url: str) -> str:
    """The local copy of `url` under TORCH_HOME/hub/checkpoints/<sha256 of the whole URL>/<name>.

    torch.hub keys its cache by file name only, so two URLs ending in the same name would share
    one file. A name with DeiT's hash suffix is checked against the download's sha256."""
    name = os.path.basename(urlparse(url).path) or 'checkpoint.pth'
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    folder = os.path.join(torch.hub.get_dir(), 'checkpoints', key)
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        os.makedirs(folder, exist_ok=True)
        match = HASH_SUFFIX.search(name)
        print(f'Downloading {url} to {path}', flush=True)
        # a temporary file, moved into place only when complete (and its hash checked)
        torch.hub.download_url_to_file(url, path, hash_prefix=match.group(1) if match else None,
                                       progress=False)
    return path


def _unreadable_reason(path: str, error: Exception) -> str:
    """One line on why torch.load(weights_only=True) refused or failed on `path`."""
    with open(path, 'rb') as f:
        head = f.read(4)
    if not head.startswith(b'PK') and not head.startswith(b'\x80'):
        # neither torch.save's zip archive nor a pickle (protocol 2 and later start with 0x80)
        return 'it is not a file written by torch.save'
    text = str(error)
    lines = text.strip().splitlines()
    first = lines[0][:160] if lines else type(error).__name__
    if head.startswith(b'PK') and not zipfile.is_zipfile(path):
        return f'a damaged or truncated torch.save archive ({first})'
    unsafe = re.search(r'GLOBAL (\S+) (was not an allowed global|whose module \S+ is blocked)', text)
    if unsafe:
        return (f'it would call {unsafe.group(1)} while loading, and only tensors and plain '
                'containers are loaded (weights_only=True: a pickle can run code)')
    if 'Weights only load failed' in text:
        detail = [line.strip() for line in text.split('WeightsUnpickler error:')[-1].splitlines()
                  if line.strip() and 'Weights only load failed' not in line
                  and not line.strip().startswith(('Check the documentation', '(1)', '(2)'))]
        return ('it holds objects other than tensors and plain containers, which are not loaded '
                f'(weights_only=True: a pickle can run code){": " + detail[0] if detail else ""}')
    return first


def is_safetensors(path_or_url: str) -> bool:
    """A `.safetensors` file or URL (its path, not a query, ends so)."""
    return (urlparse(path_or_url).path if is_url(path_or_url) else path_or_url).endswith('.safetensors')


def _download(url: str, what: str) -> str:
    """The local copy of `url` (`cached_download`); CheckpointError (one line) if it fails."""
    try:
        return cached_download(url)
    except Exception as e:  # a failed download or hash
        digest = re.match(r'invalid hash value \(expected "\w+", got "(\w{8})', str(e))
        if digest:
            raise CheckpointError(f'{what} {url}: the download\'s sha256 begins {digest.group(1)}, '
                                  'not with the hash its name ends in: a damaged or another file (not kept)') from None
        raise CheckpointError(f'{what} {url} could not be downloaded: {first_line(e, 200)}') from None


def hf_hub_folder(hub_id: str, what: str = 'checkpoint') -> str:
    """The folder of huggingface_hub's cache that holds `hub_id`'s (`ORG/NAME[@REVISION]`)
    weights, `model.safetensors` or else `pytorch_model.bin` (timm's order), and its
    `config.json` when it has one; downloaded there unless already cached (HF_HUB_OFFLINE=1
    reads the cache only). CheckpointError (one line naming `hf-hub:hub_id`) if neither is found."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    repo_id, _, revision = hub_id.partition('@')
    source = f'{what} hf-hub:{hub_id}'
    path = None
    try:
        for name in WEIGHT_FILES:
            try:
                path = hf_hub_download(repo_id, name, revision=revision or None)
                break
            except EntryNotFoundError as e:  # not in the repo, or not in the cache when offline
                missing = e
        if path is None:
            raise CheckpointError(f'{source}: neither {" nor ".join(WEIGHT_FILES)} is in the repo or in the '
                                  f'local Hugging Face cache ({first_line(missing, 200)})')
        try:
            hf_hub_download(repo_id, CONFIG, revision=revision or None)  # beside the weights
        except EntryNotFoundError:
            pass  # weights without a timm config: read as a bare state dict
    except CheckpointError:
        raise
    except Exception as e:  # no such repo or revision, a bad id, no network, ...
        raise CheckpointError(f'{source} could not be read: {type(e).__name__}: {first_line(e, 200)}') from None
    return os.path.dirname(path)


def _read_hf_hub(hub_id: str, what: str) -> dict:
    """`hf-hub:ID` read as its cached folder is (`read_timm_folder`), or its weights alone
    when the repo has no config.json."""
    folder = hf_hub_folder(hub_id, what)
    try:
        if os.path.isfile(os.path.join(folder, CONFIG)):
            return read_timm_folder(folder)
        path = weights_file(folder)
        return read_safetensors_checkpoint(path) if path.endswith('.safetensors') else \
            read_checkpoint(path, 'its weights file')
    except ValueError as e:
        raise CheckpointError(f'{what} hf-hub:{hub_id}: {e}') from None


def _read_hub_format(path_or_url: str, what: str) -> dict:
    """A timm folder (`local-dir:FOLDER`) or a `.safetensors` file or URL: a URL reads as its
    local copy does, with the `arch` and the rest of its metadata."""
    path = _download(path_or_url, what) if is_url(path_or_url) else path_or_url
    try:
        if path.startswith('local-dir:'):
            return read_timm_folder(path[len('local-dir:'):])
        if not os.path.isfile(path):
            raise ValueError('is not a regular file' if os.path.exists(path) else 'does not exist')
        return read_safetensors_checkpoint(path)
    except ValueError as e:
        raise CheckpointError(f'{what} {path_or_url}: {e}') from None


def read_checkpoint(path_or_url: str, what: str = 'checkpoint') -> dict:
    """Load a checkpoint with weights_only=True from a file or a URL, or the weights of a
    `.safetensors` file, a timm folder (`local-dir:FOLDER`, with its `arch` if it has one) or a
    Hugging Face Hub model (`hf-hub:ID`, `hf_hub_folder`); `what` names it in the
    CheckpointError (a flag, say) if it is not one."""
    path_or_url = str(path_or_url)
    if path_or_url.startswith('hf-hub:'):
        return _read_hf_hub(path_or_url[len('hf-hub:'):], what)
    if path_or_url.startswith('local-dir:') or is_safetensors(path_or_url):
        return _read_hub_format(path_or_url, what)
    path = _download(path_or_url, what) if is_url(path_or_url) else path_or_url
    try:
        if os.path.isdir(path):
            hint = os.path.join(path_or_url, 'checkpoint.pth')
            raise CheckpointError(f'{what} {path_or_url} is a folder, not a checkpoint file'
                                  + (f' (did you mean {hint}?)' if os.path.isfile(hint) else ''))
        elif not os.path.isfile(path):
            raise CheckpointError(f'{what} {path_or_url} ' + ('is not a regular file' if os.path.exists(path)
                                                              else 'does not exist'))
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # a damaged file, a refused pickle, ...
        reason = _unreadable_reason(path, e) if os.path.isfile(path) else \
            first_line(e, 200)
        raise CheckpointError(f'{what} {path_or_url} is not a readable PyTorch checkpoint: {reason}') from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'{what} {path_or_url} holds a {type(ckpt).__name__}, not a dict')
    return ckpt
