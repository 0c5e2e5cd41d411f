import argparse
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
from datasets import build_dataset, build_transform

SIZE = 32


def make_args(data_set, data_path=None, **kw):
    args = argparse.Namespace(data_set=data_set, data_path=data_path, input_size=SIZE, inat_category='name',
                              color_jitter=0.3, aa='rand-m9-mstd0.5-inc1', train_interpolation='bicubic',
                              reprob=0.25, remode='pixel', recount=1, skip_bad_images=False)
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def write_img(path, value=128):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.full((8, 8, 3), value, dtype=np.uint8)
    arr[::2, ::2] = 255 - value  # some texture so augmentations have something to do
    Image.fromarray(arr).save(path)


def make_class_tree(root, classes=('cat', 'dog', 'eel'), per_class=(2, 1), splits=('train', 'val')):
    for split, n in zip(splits, per_class):
        for c in classes:
            for i in range(n):
                write_img(os.path.join(root, split, c, f'{c}_{i}.{"png" if i % 2 else "jpg"}'))
    return str(root)


def check_sample(dataset):
    img, target = dataset[0]
    assert isinstance(img, torch.Tensor) and img.shape == (3, SIZE, SIZE)
    assert isinstance(target, int)


def check_both_splits(args):
    train, nb_train = build_dataset(True, args)
    val, nb_val = build_dataset(False, args)
    assert nb_train == nb_val
    check_sample(train)
    check_sample(val)
    assert list(train.targets) == [t for _, t in (train[i] for i in range(len(train)))]
    return train, val, nb_train


def raises_one_line(exc, match, fn, *a):
    with pytest.raises(exc, match=match) as info:
        fn(*a)
    msg = str(info.value)
    assert msg and '\n' not in msg
    return msg


# ---------------------------------------------------------------- class-folder layouts

@pytest.mark.parametrize('data_set', ['IMNET', 'FOLDER', 'IFOOD'])
def test_class_folder_tree(tmp_path, data_set):
    root = make_class_tree(tmp_path)
    train, val, nb = check_both_splits(make_args(data_set, root))
    assert nb == 3
    assert (len(train), len(val)) == (6, 3)
    assert train.classes == ['cat', 'dog', 'eel']
    path, target = val.samples[val.targets.index(2)]
    assert os.path.basename(path) == 'eel_0.jpg' and target == 2


def test_folder_val_missing(tmp_path):
    root = make_class_tree(tmp_path, splits=('train',))
    for is_train in (True, False):  # train must fail too, before any training starts
        msg = raises_one_line(FileNotFoundError, 'no val split', build_dataset, is_train, make_args('FOLDER', root))
        assert os.path.join(root, 'val') in msg


def test_imnet_train_missing(tmp_path):
    root = make_class_tree(tmp_path, splits=('val',))
    raises_one_line(FileNotFoundError, 'no train split', build_dataset, False, make_args('IMNET', root))


def test_folder_class_mismatch(tmp_path):
    root = make_class_tree(tmp_path)
    write_img(os.path.join(root, 'val', 'fox', 'a.png'))
    raises_one_line(ValueError, r'class folders .* differ.*fox', build_dataset, True, make_args('FOLDER', root))


def test_folder_empty_class_is_named(tmp_path):
    root = make_class_tree(tmp_path)
    for split in ('train', 'val'):
        os.makedirs(os.path.join(root, split, 'fox', 'sub'))  # a class folder with no image
    msg = raises_one_line(ValueError, 'holds no image', build_dataset, True, make_args('FOLDER', root))
    assert msg.startswith(f'class folder {os.path.join(root, "train", "fox")} holds no image (.jpg, ')


@pytest.mark.parametrize('data_set', ['FOLDER', 'IFOOD'])
def test_unreadable_image_is_named_or_marked(tmp_path, data_set):
    """ImageFolder (FOLDER) and ListDataset (iFood's csv layout) read alike."""
    root = make_ifood(str(tmp_path)) if data_set == 'IFOOD' else make_class_tree(tmp_path)
    train, _ = build_dataset(True, make_args(data_set, root))
    path, target = train.samples[1]
    with open(path, 'wb') as f:
        f.write(b'\xff\xd8\xff\xe0 truncated jpeg')
    msg = raises_one_line(datasets.UnreadableImageError, 'unreadable image', train.__getitem__, 1)
    assert msg.startswith(f'unreadable image {path}: ') and msg.endswith('(--skip-bad-images skips such images)')
    skipping, _ = build_dataset(True, make_args(data_set, root, skip_bad_images=True))
    img, marked = skipping[1]
    assert marked == datasets.UNREADABLE and img.shape == (3, SIZE, SIZE)
    check_sample(skipping)  # the others read as before
    # what a DataLoader worker's exception becomes in the main process: the message survives
    worker = datasets.UnreadableImageError(
        f'Caught UnreadableImageError in DataLoader worker process 0.\nOriginal Traceback (most recent '
        f'call last):\n  File "x.py", line 1, in f\ndatasets.UnreadableImageError: {msg}\n')
    assert str(worker) == msg


@pytest.mark.parametrize('data_path', [None, ''])
@pytest.mark.parametrize('data_set', ['IMNET', 'FOLDER', 'CIFAR10', 'CIFAR100', 'INAT18', 'INAT19', 'IFOOD'])
def test_data_path_required(data_set, data_path):
    raises_one_line(ValueError, f'--data-path is required for --data-set {data_set}',
                    build_dataset, True, make_args(data_set, data_path))


def test_data_path_does_not_exist(tmp_path):
    missing = str(tmp_path / 'nope')
    msg = raises_one_line(FileNotFoundError, 'does not exist', build_dataset, True, make_args('IMNET', missing))
    assert missing in msg


def test_unknown_data_set(tmp_path):
    raises_one_line(ValueError, r"unknown --data-set 'FOO'; choose from CIFAR10, CIFAR100, IMNET",
                    build_dataset, True, make_args('FOO', str(tmp_path)))


# ---------------------------------------------------------------- iFood official layout

def make_ifood(root, class_list=True, val_csv=True):
    rows = {'train': [('t0.jpg', 0), ('t1.jpg', 4), ('t2.jpg', 2)], 'val': [('v0.jpg', 4), ('v1.jpg', 1)]}
    for split, items in rows.items():
        for name, _ in items:
            write_img(os.path.join(root, f'{split}_set', name))
        if split == 'val' and not val_csv:
            continue
        with open(os.path.join(root, f'{split}_labels.csv'), 'w') as f:
            f.write('img_name,label\n' + ''.join(f'{n},{t}\n' for n, t in items))
    if class_list:
        with open(os.path.join(root, 'class_list.txt'), 'w') as f:
            f.write(''.join(f'{i} food_{i}\n' for i in range(251)))
    return str(root)


def test_ifood_official(tmp_path):
    root = make_ifood(tmp_path)
    train, val, nb = check_both_splits(make_args('IFOOD', root))
    assert nb == 251
    assert (len(train), len(val)) == (3, 2)
    assert train.targets == [0, 4, 2] and val.targets == [4, 1]
    assert val.samples[0] == (os.path.join(root, 'val_set', 'v0.jpg'), 4)


def test_ifood_official_without_class_list(tmp_path):
    root = make_ifood(tmp_path, class_list=False)
    _, nb = build_dataset(False, make_args('IFOOD', root))
    assert nb == 5  # max label (4) + 1 over both csvs


def test_ifood_val_csv_missing(tmp_path):
    root = make_ifood(tmp_path, val_csv=False)
    msg = raises_one_line(FileNotFoundError, 'no val split', build_dataset, True, make_args('IFOOD', root))
    assert os.path.join(root, 'val_labels.csv') in msg


def test_ifood_bad_csv(tmp_path):
    root = make_ifood(tmp_path)
    with open(os.path.join(root, 'val_labels.csv'), 'w') as f:
        f.write('img_name,label\nv0.jpg,soup\n')
    raises_one_line(ValueError, r'val_labels.csv:2: expected', build_dataset, False, make_args('IFOOD', root))


def test_ifood_nothing(tmp_path):
    raises_one_line(FileNotFoundError, 'no train split', build_dataset, True, make_args('IFOOD', str(tmp_path)))


# ---------------------------------------------------------------- iNaturalist

CATEGORIES = [  # two taxonomy levels are enough to check the level mapping
    {'id': 0, 'name': 'Quercus robur', 'genus': 'Quercus', 'kingdom': 'Plantae'},
    {'id': 1, 'name': 'Quercus ilex', 'genus': 'Quercus', 'kingdom': 'Plantae'},
    {'id': 2, 'name': 'Pinus pinea', 'genus': 'Pinus', 'kingdom': 'Plantae'},
]


def make_inat(root, year, val=True):
    splits = {'train': [2, 0, 1, 2], 'val': [1, 2]}
    if not val:
        del splits['val']
    for split, cats in splits.items():
        images, anns = [], []
        for i, c in enumerate(cats):
            rel = f'train_val{year}/Plantae/{c}/{split}_{i}.jpg'
            write_img(os.path.join(root, rel), value=40 * c)
            images.append({'id': 100 * (split == 'val') + i, 'file_name': rel, 'width': 8, 'height': 8})
            anns.append({'id': i, 'image_id': 100 * (split == 'val') + i, 'category_id': c})
        with open(os.path.join(root, f'{split}{year}.json'), 'w') as f:
            json.dump({'images': images, 'annotations': anns, 'categories': CATEGORIES}, f)
    with open(os.path.join(root, 'categories.json'), 'w') as f:
        json.dump(CATEGORIES, f)
    return str(root)


@pytest.mark.parametrize('data_set,year', [('INAT18', 2018), ('INAT19', 2019)])
def test_inat_name(tmp_path, data_set, year):
    root = make_inat(tmp_path, year)
    train, val, nb = check_both_splits(make_args(data_set, root))
    assert nb == 3
    assert (len(train), len(val)) == (4, 2)
    # classes numbered by first appearance in train: Pinus pinea=0, Quercus robur=1, Quercus ilex=2
    assert train.targets == [0, 1, 2, 0]
    assert val.targets == [2, 0]
    assert val.samples[0][0] == os.path.join(root, f'train_val{year}/Plantae/1/val_0.jpg')


def test_inat_genus(tmp_path):
    root = make_inat(tmp_path, 2019)
    args = make_args('INAT19', root, inat_category='genus')
    train, nb = build_dataset(True, args)
    val, _ = build_dataset(False, args)
    assert nb == 2
    assert train.targets == [0, 1, 1, 0]  # Pinus=0, Quercus=1
    assert val.targets == [1, 0]
    _, nb_kingdom = build_dataset(True, make_args('INAT19', root, inat_category='kingdom'))
    assert nb_kingdom == 1


def test_inat_unknown_category(tmp_path):
    root = make_inat(tmp_path, 2018)
    raises_one_line(ValueError, "unknown --inat-category 'species'", build_dataset, True,
                    make_args('INAT18', root, inat_category='species'))


def test_inat_level_absent_from_categories(tmp_path):
    root = make_inat(tmp_path, 2018)
    raises_one_line(ValueError, "has no 'family'", build_dataset, True,
                    make_args('INAT18', root, inat_category='family'))


def test_inat_val_missing(tmp_path):
    root = make_inat(tmp_path, 2019, val=False)
    msg = raises_one_line(FileNotFoundError, 'annotations missing', build_dataset, True, make_args('INAT19', root))
    assert os.path.join(root, 'val2019.json') in msg


def test_inat_wrong_year(tmp_path):
    root = make_inat(tmp_path, 2019)
    msg = raises_one_line(FileNotFoundError, 'iNaturalist 2018', build_dataset, True, make_args('INAT18', root))
    assert 'train2018.json' in msg


# ---------------------------------------------------------------- CIFAR

def make_fake_cifar10(root, n=4):
    base = os.path.join(root, 'cifar-10-batches-py')
    os.makedirs(base)
    rng = np.random.default_rng(0)
    names = [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']
    for k, name in enumerate(names):
        entry = {'data': rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 'labels': [(k + i) % 10 for i in range(n)]}
        with open(os.path.join(base, name), 'wb') as f:
            pickle.dump(entry, f)
    with open(os.path.join(base, 'batches.meta'), 'wb') as f:
        pickle.dump({'label_names': [f'c{i}' for i in range(10)]}, f)
    return str(root)


def test_cifar10_absent(tmp_path):
    for is_train in (True, False):
        msg = raises_one_line(FileNotFoundError, 'CIFAR10 not found', build_dataset, is_train,
                              make_args('CIFAR10', str(tmp_path)))
        assert str(tmp_path) in msg and 'cifar-10-batches-py' in msg and 'downloading is disabled' in msg


def test_cifar100_absent(tmp_path):
    msg = raises_one_line(FileNotFoundError, 'CIFAR100 not found', build_dataset, True,
                          make_args('CIFAR100', str(tmp_path)))
    assert 'cifar-100-python' in msg


def test_cifar10_val_missing(tmp_path):
    root = make_fake_cifar10(tmp_path)
    os.remove(os.path.join(root, 'cifar-10-batches-py', 'test_batch'))
    raises_one_line(FileNotFoundError, r'missing: test_batch', build_dataset, True, make_args('CIFAR10', root))


def test_cifar10_fake(tmp_path, monkeypatch):
    root = make_fake_cifar10(tmp_path)
    # our pickles are valid but cannot match torchvision's md5 sums
    monkeypatch.setattr('torchvision.datasets.cifar.check_integrity', lambda *a, **k: True)
    train, val, nb = check_both_splits(make_args('CIFAR10', root))
    assert nb == 10
    assert (len(train), len(val)) == (20, 4)
    assert val.targets == [5, 6, 7, 8]


def test_cifar10_corrupted(tmp_path):
    root = make_fake_cifar10(tmp_path)
    raises_one_line(ValueError, 'corrupted', build_dataset, True, make_args('CIFAR10', root))


# ---------------------------------------------------------------- DIGITS

def test_digits():
    args = make_args('DIGITS', '/ignored/path')
    train, nb = build_dataset(True, args)
    val, nb_val = build_dataset(False, args)
    assert nb == nb_val == 10
    assert len(train) + len(val) == 1797 and len(val) == 360
    assert set(train.indices).isdisjoint(val.indices)
    assert sorted(set(train.indices) | set(val.indices)) == list(range(1797))
    assert set(val.targets) == set(range(10)) and set(train.targets) == set(range(10))
    # stratified: every class holds ~20% of its samples in val
    counts_val, counts_train = np.bincount(val.targets), np.bincount(train.targets)
    assert np.all(np.abs(counts_val / (counts_val + counts_train) - 0.2) < 0.02)
    check_sample(train)
    check_sample(val)
    # same split on a second call (and with or without a data path)
    again, _ = build_dataset(False, make_args('DIGITS', None))
    assert list(again.indices) == list(val.indices) and again.targets == val.targets


def test_digits_pixels():
    from sklearn.datasets import load_digits
    val, _ = build_dataset(False, make_args('DIGITS'))
    raw = load_digits().images[val.indices[0]]
    assert val.images[0].dtype == np.uint8 and val.images[0].max() <= 255
    assert np.array_equal(val.images[0], np.round(raw * 255 / 16).astype(np.uint8))


def test_digits_domains_are_image_disjoint_and_shifted():
    from sklearn.datasets import load_digits
    raw = load_digits()
    parts = {(d, t): build_dataset(t, make_args(d))[0] for d in ('DIGITS_SOURCE', 'DIGITS_TARGET')
             for t in (True, False)}
    source = set(parts['DIGITS_SOURCE', True].indices) | set(parts['DIGITS_SOURCE', False].indices)
    target = set(parts['DIGITS_TARGET', True].indices) | set(parts['DIGITS_TARGET', False].indices)
    assert source.isdisjoint(target) and len(source | target) == 1797
    assert abs(len(source) / 1797 - 0.4) < 0.01
    for (domain, train), ds in parts.items():
        assert set(ds.targets) == set(range(10))  # every class in every split
        assert set(ds.indices).isdisjoint(parts[domain, not train].indices)
        i = ds.indices[0]
        plain = np.round(raw.images[i] * 255 / 16).astype(np.uint8)
        # the source shows the digit as it is; the target rotated by 90° and inverted
        expected = plain if domain == 'DIGITS_SOURCE' else 255 - np.rot90(plain, k=-1)
        assert np.array_equal(ds.images[0], expected)
        assert ds.targets[0] == raw.target[i]
        check_sample(ds)


# ---------------------------------------------------------------- transforms

def test_train_transform_flip():
    names = lambda a: [type(t).__name__ for t in build_transform(True, a).transforms]  # noqa: E731
    assert 'RandomHorizontalFlip' in names(make_args('FOLDER'))
    assert 'RandomHorizontalFlip' not in names(make_args('DIGITS'))


def test_transform_sizes():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    for size in (32, 64):
        args = make_args('FOLDER', input_size=size)
        train_t, eval_t = build_transform(True, args), build_transform(False, args)
        assert train_t(img).shape == eval_t(img).shape == (3, size, size)
    small_train = build_transform(True, make_args('CIFAR10')).transforms[0]
    assert 'RandomCrop' in repr(small_train) and 'RandomResizedCrop' not in repr(small_train)
    big_train = build_transform(True, make_args('IMNET', input_size=224)).transforms[0]
    assert 'RandomResizedCrop' in type(big_train).__name__
    big_eval = build_transform(False, make_args('IMNET', input_size=224)).transforms
    assert big_eval[0].size == 256 and big_eval[1].size == (224, 224)


def test_cifar_sized_images_untouched_by_eval():
    # At 32px the eval transform must be exactly ToTensor+Normalize on a 32x32 image (DeiT's CIFAR eval).
    arr = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = build_transform(False, make_args('CIFAR10'))(Image.fromarray(arr))
    mean = torch.tensor(datasets.IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(datasets.IMAGENET_DEFAULT_STD).view(3, 1, 1)
    expected = (torch.from_numpy(arr).permute(2, 0, 1).float() / 255 - mean) / std
    assert torch.allclose(out, expected, atol=1e-6)
