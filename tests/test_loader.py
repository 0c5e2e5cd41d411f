"""One way from a checkpoint to a model (models.load_model): every format the project reads
gives the model it was made from, and nothing outside models/ builds a model from an `arch`
by another road."""
import ast
import os

import pytest
import torch

import models
from conftest import REPO, micro, o1_weights
from test_hub import cut_checkpoint

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model.eval()(X)


def test_every_checkpoint_format_loads_into_the_model_it_came_from(tmp_path):
    """torch.save with an arch (a cut model), a dense state dict named by --model, a bare state
    dict, a .safetensors file and a timm folder, each read by the same reader and loader."""
    from train.checkpoints import load_checkpoint_file
    cut = cut_checkpoint(tmp_path / 'cut.pth')
    dense = o1_weights(micro(3), seed=4).eval()
    torch.save({'model': dense.state_dict()}, tmp_path / 'dense.pth')
    torch.save(dense.state_dict(), tmp_path / 'bare.pth')
    models.write_safetensors_checkpoint(str(tmp_path / 'cut.safetensors'), {'model': cut.state_dict(),
                                                                            'arch': cut.arch()})
    models.write_timm_folder(cut, str(tmp_path / 'folder'), {'input_size': (3, 32, 32)})
    cases = {'cut.pth': cut, 'dense.pth': dense, 'bare.pth': dense, 'cut.safetensors': cut,
             f'local-dir:{tmp_path / "folder"}': cut}
    for source, expected in cases.items():
        path = source if source.startswith('local-dir:') else str(tmp_path / source)
        model = models.load_model(load_checkpoint_file(path), 'deit_micro_patch4_32')
        assert model.arch() == expected.arch(), source
        assert torch.equal(logits(model), logits(expected)), source


def test_a_checkpoint_that_does_not_fit_is_one_line():
    dense = micro(0)
    state = dense.state_dict()
    with pytest.raises(ValueError, match=r'^has no "arch": name its model$'):
        models.load_model({'model': state})
    with pytest.raises(ValueError, match=r'^its weights do not fit deit_micro_patch4_32: missing keys \(1\): head.bias'):
        models.load_model({'model': {k: v for k, v in state.items() if k != 'head.bias'}}, 'deit_micro_patch4_32')
    with pytest.raises(ValueError, match=r"^unknown model 'no_such_model'"):
        models.load_model({'model': state}, 'no_such_model')
    with pytest.raises(ValueError, match=r'^holds no weights'):
        models.load_model({'args': {}}, 'deit_micro_patch4_32')


def test_build_from_arch_is_called_outside_models_only_through_the_loader():
    calls = []
    for folder in ('.', 'pruning', 'train', 'train/methods', 'scripts'):
        for name in os.listdir(os.path.join(REPO, folder)):
            if not name.endswith('.py'):
                continue
            path = os.path.join(REPO, folder, name)
            tree = ast.parse(open(path).read())
            calls += [f'{folder}/{name}:{n.lineno}' for n in ast.walk(tree) if isinstance(n, ast.Call)
                      and getattr(n.func, 'attr', getattr(n.func, 'id', None)) == 'build_from_arch']
    assert not calls, calls
