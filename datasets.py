# Dataset and transform factories for the training CLI (DeiT-style).
import csv
import json
import os
import sys

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader, find_classes, has_file_allowed_extension
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

DATA_SETS = ('CIFAR10', 'CIFAR100', 'IMNET', 'INAT18', 'INAT19', 'IFOOD', 'FOLDER', 'DIGITS',
             'DIGITS_SOURCE', 'DIGITS_TARGET')
INAT_CATEGORIES = ('name', 'genus', 'family', 'order', 'class', 'phylum', 'kingdom', 'supercategory')
# torchvision's on-disk layout; listed so a missing file is reported before torchvision's vague error.
CIFAR_FILES = {
    'CIFAR10': ('cifar-10-batches-py', [f'data_batch_{i}' for i in range(1, 6)], ['test_batch'], 'batches.meta'),
    'CIFAR100': ('cifar-100-python', ['train'], ['test'], 'meta'),
}
DIGITS_VAL_FRACTION = 0.2
DIGITS_SEED = 0
# The transfer setting in miniature (METHOD.md §1): a model pretrained on the source domain is
# pruned while it is fine-tuned on a shifted target domain. The two domains hold disjoint images.
DIGITS_SOURCE_FRACTION = 0.4
DIGITS_DOMAINS = {'DIGITS': None, 'DIGITS_SOURCE': 'source', 'DIGITS_TARGET': 'target'}


# the target of an image that could not be read, under --skip-bad-images (engine.py drops the row)
UNREADABLE = -1
# what PIL raises on a file that is not an image, is truncated or damaged, or cannot be opened
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class UnreadableImageError(Exception):
    """An image file that could not be read: main.py prints it as one line.

    DataLoader re-raises an exception of a worker process as type(message with the worker's
    traceback); the last line of that traceback is the message: it is kept, the rest dropped."""

    def __init__(self, message):
        super().__init__(message.strip().splitlines()[-1].split('UnreadableImageError: ', 1)[-1])


class ReadChecked:
    """__getitem__ of image files that names an unreadable file (UnreadableImageError), or with
    `skip_bad` reports it on stderr and returns a placeholder image with target UNREADABLE."""
    skip_bad = False

    def read(self, index):
        path, target = self.samples[index]
        try:
            img = self.loader(path)
        except READ_ERRORS as e:
            # PIL's own message repeats the path (as a file object's repr)
            reason = 'not an image PIL can identify' if isinstance(e, UnidentifiedImageError) \
                else (str(e).strip().splitlines() or [type(e).__name__])[0]
            if not self.skip_bad:
                raise UnreadableImageError(f'unreadable image {path}: {reason} '
                                           '(--skip-bad-images skips such images)') from None
            print(f'warning: skipped unreadable image {path}: {reason}', file=sys.stderr, flush=True)
            img, target = Image.new('RGB', (8, 8)), UNREADABLE
        if self.transform is not None:
            img = self.transform(img)
        return img, target


class ListDataset(ReadChecked, Dataset):
    """(path, target) pairs read with the ImageFolder loader; for layouts ImageFolder cannot index."""

    def __init__(self, samples, transform=None, loader=default_loader, skip_bad=False):
        self.samples = samples
        self.targets = [t for _, t in samples]
        self.transform = transform
        self.loader = loader
        self.skip_bad = skip_bad

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.read(index)


def _inside(path, folder):
    return os.path.commonpath([path, folder]) == folder


def class_files(class_dir):
    """The files of a class folder, in torchvision's order, each image once and with the label of
    the folder it really lies in. torchvision follows every link: a link back up the tree repeats
    the images (4 files became 84) and a link out of the folder lends them this class's label.
    Here no link is followed: one that resolves inside the class folder names a file or folder
    already read (skipped, with a warning); one that resolves outside it is refused (ValueError,
    one line), since which label its images should have is the user's call, not ours. A class
    folder that is itself a link (to a folder elsewhere) is read as that folder."""
    top, folders, files = os.path.realpath(class_dir), [class_dir], {}
    while folders:
        folder = folders.pop()
        files[folder] = []
        with os.scandir(folder) as entries:  # d_type: no stat per file, as os.walk
            for e in entries:
                if not e.is_symlink():
                    (folders if e.is_dir(follow_symlinks=False) else files[folder]).append(e.path)
                    continue
                target = os.path.realpath(e.path)
                if not _inside(target, top):
                    raise ValueError(f'{e.path} links to {target}, outside its class folder {class_dir}: '
                                     'what it holds would take this class\'s label; copy it in, or remove the link')
                print(f'warning: skipped {e.path}, a link to {target}, which this class folder already holds',
                      file=sys.stderr, flush=True)
    return [path for folder in sorted(files) for path in sorted(files[folder])]


class ImageFolder(ReadChecked, datasets.ImageFolder):
    """torchvision's ImageFolder, reading like ListDataset; an empty class folder is named; links
    in class folders are never followed (`class_files`)."""

    def __init__(self, root, transform=None, skip_bad=False):
        try:
            super().__init__(root, transform=transform)
        except FileNotFoundError:
            classes, _ = find_classes(root)
            empty = [os.path.join(root, c) for c in classes
                     if not any(f.lower().endswith(IMG_EXTENSIONS)
                                for _, _, files in os.walk(os.path.join(root, c)) for f in files)]
            raise ValueError(f'class folder {", ".join(empty[:3])}{" …" if len(empty) > 3 else ""} '
                             f'holds no image ({", ".join(IMG_EXTENSIONS)})') from None
        self.skip_bad = skip_bad

    def __getitem__(self, index):
        return self.read(index)

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        """torchvision's (path, class index) list, read by `class_files`; two class folders that
        are one folder (or one inside the other, through a link) are refused."""
        # sorted by path components, a folder comes right before the first folder inside it
        real = sorted((os.path.realpath(os.path.join(directory, c)).split(os.sep), c) for c in class_to_idx)
        for (outer, a), (inner, b) in zip(real, real[1:]):
            if inner[:len(outer)] == outer:
                raise ValueError(f'class folders {os.path.join(directory, a)} and {os.path.join(directory, b)} '
                                 f'are {"one folder" if inner == outer else "one inside the other"} '
                                 f'({os.sep.join(outer)}): their images would have two labels')
        valid = is_valid_file or (lambda path: has_file_allowed_extension(path, extensions))
        samples = [(path, class_to_idx[c]) for c in sorted(class_to_idx)
                   for path in class_files(os.path.join(directory, c)) if valid(path)]
        present = {t for _, t in samples}
        empty = {c for c, t in class_to_idx.items() if t not in present}
        if empty and not allow_empty:
            raise FileNotFoundError(f'found no valid file for the classes {", ".join(sorted(empty))}')
        return samples


class DigitsDataset(Dataset):
    """scikit-learn's bundled 8x8 digits (1797 images): a smoke-test dataset needing no download.

    `domain` None uses all images. 'source' and 'target' split them first into two disjoint,
    class-stratified pools (40% / 60%): the source domain shows its digits as they are; the
    target domain shows the other images rotated by 90° and with inverted intensities (dark
    strokes on a bright background), a shift a model trained on the source does not survive.
    Each pool is then split 80 / 20 into train and val, with fixed seeds, so every process and
    every later run sees the same images.
    """

    def __init__(self, train=True, transform=None, domain=None):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        if domain not in (None, 'source', 'target'):
            raise ValueError(f'unknown digits domain {domain!r}')
        digits = load_digits()
        pool = np.arange(len(digits.target))
        if domain is not None:
            source, target = train_test_split(pool, train_size=DIGITS_SOURCE_FRACTION,
                                              stratify=digits.target, random_state=DIGITS_SEED)
            pool = np.sort(source if domain == 'source' else target)
        # Fixed seed + stratify: every process (DDP ranks, later eval runs) sees the same split.
        train_idx, val_idx = train_test_split(pool, test_size=DIGITS_VAL_FRACTION,
                                              stratify=digits.target[pool], random_state=DIGITS_SEED)
        self.indices = np.sort(train_idx if train else val_idx)
        # Pixel values are 0..16; stretch to 8-bit so PIL-based augmentations behave normally.
        images = np.round(digits.images[self.indices] * 255.0 / 16.0).astype(np.uint8)
        if domain == 'target':
            images = 255 - np.rot90(images, k=-1, axes=(1, 2))
        self.images = np.ascontiguousarray(images)
        self.targets = [int(t) for t in digits.target[self.indices]]
        self.classes = [str(i) for i in range(10)]
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        img = Image.fromarray(self.images[index]).convert('RGB')  # uint8 2-D array -> 'L'
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


def _require_file(path, what):
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{what}: expected file {path}')


def _require_dir(path, what):
    if not os.path.isdir(path):
        raise FileNotFoundError(f'{what}: expected folder {path}')


def _cifar(name, root, is_train, transform):
    folder, train_files, val_files, meta = CIFAR_FILES[name]
    base = os.path.join(root, folder)
    # Check the val files too, so a half-copied dataset fails before training starts.
    missing = [f for f in train_files + val_files + [meta] if not os.path.isfile(os.path.join(base, f))]
    if missing:
        raise FileNotFoundError(
            f'{name} not found in {root}: put the extracted python-version archive there as {base}/ '
            f'(missing: {", ".join(missing)}); downloading is disabled')
    cls = datasets.CIFAR10 if name == 'CIFAR10' else datasets.CIFAR100
    try:
        return cls(root, train=is_train, transform=transform, download=False)
    except RuntimeError as e:  # torchvision's md5 check
        raise ValueError(f'{name} files in {base} are corrupted ({e}); re-extract the archive there') from e


def _image_folder(root, is_train, transform, skip_bad=False):
    """train/ and val/ class-folder trees; val must have exactly train's classes so indices agree."""
    train_dir, val_dir = os.path.join(root, 'train'), os.path.join(root, 'val')
    _require_dir(train_dir, f'dataset tree {root} has no train split')
    _require_dir(val_dir, f'dataset tree {root} has no val split')
    train_classes, _ = find_classes(train_dir)
    val_classes, _ = find_classes(val_dir)
    if val_classes != train_classes:
        diff = sorted(set(train_classes) ^ set(val_classes))
        raise ValueError(f'class folders of {train_dir} and {val_dir} differ: {diff[:10]}')
    dataset = ImageFolder(train_dir if is_train else val_dir, transform=transform, skip_bad=skip_bad)
    return dataset, len(train_classes)


def _inat(root, year, category, is_train, transform, skip_bad=False):
    if category not in INAT_CATEGORIES:
        raise ValueError(f'unknown --inat-category {category!r}; choose from {", ".join(INAT_CATEGORIES)}')
    paths = {name: os.path.join(root, f'{name}.json') for name in (f'train{year}', f'val{year}', 'categories')}
    for name, path in paths.items():
        _require_file(path, f'iNaturalist {year} annotations missing in {root}')

    def load(name):
        with open(paths[name]) as f:
            return json.load(f)

    catg = load('categories')
    # Official files list categories by id (id == position); honour 'id' when present anyway.
    catg = {int(c.get('id', i)): c for i, c in enumerate(catg)}

    def level(cat_id, path):
        try:
            return catg[int(cat_id)][category]
        except KeyError:
            raise ValueError(f'{paths["categories"]} has no {category!r} for category_id {cat_id} '
                             f'used in {path}') from None

    train = load(f'train{year}')
    # Classes are numbered by first appearance in the train annotations, as DeiT's INatDataset does,
    # so the same label space is used for the train and val splits.
    targeter = {}
    for ann in train['annotations']:
        targeter.setdefault(level(ann['category_id'], paths[f'train{year}']), len(targeter))

    split = f'train{year}' if is_train else f'val{year}'
    data = train if is_train else load(split)
    image_cat = {ann['image_id']: ann['category_id'] for ann in data['annotations']}
    samples = []
    for img in data['images']:
        if img['id'] not in image_cat:
            raise ValueError(f'image id {img["id"]} ({img["file_name"]}) has no annotation in {paths[split]}')
        key = level(image_cat[img['id']], paths[split])
        if key not in targeter:
            raise ValueError(f'{category} {key!r} in {paths[split]} never occurs in {paths[f"train{year}"]}')
        samples.append((os.path.join(root, img['file_name']), targeter[key]))
    return ListDataset(samples, transform, skip_bad=skip_bad), len(targeter)


def _read_labels_csv(path, image_dir):
    samples = []
    with open(path, newline='') as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if header != ['img_name', 'label']:
            raise ValueError(f'{path}: expected header "img_name,label", got {",".join(header)!r}')
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                name, label = row[0].strip(), int(row[1])
            except (IndexError, ValueError):
                raise ValueError(f'{path}:{lineno}: expected "img_name,label" with an integer label, '
                                 f'got {row}') from None
            samples.append((os.path.join(image_dir, name), label))
    return samples


def _ifood(root, is_train, transform, skip_bad=False):
    if not os.path.exists(os.path.join(root, 'train_labels.csv')) and os.path.isdir(os.path.join(root, 'train')):
        return _image_folder(root, is_train, transform, skip_bad)
    parts = {}
    for split in ('train', 'val'):
        img_dir, csv_path = os.path.join(root, f'{split}_set'), os.path.join(root, f'{split}_labels.csv')
        what = f'iFood tree {root} has no {split} split (official layout; or use {split}/ class folders)'
        _require_dir(img_dir, what)
        _require_file(csv_path, what)
        parts[split] = _read_labels_csv(csv_path, img_dir)
    labels = [t for split in parts.values() for _, t in split]
    if labels and min(labels) < 0:
        raise ValueError(f'negative label {min(labels)} in the label csvs of {root}')
    class_list = os.path.join(root, 'class_list.txt')
    if os.path.isfile(class_list):
        with open(class_list) as f:
            nb_classes = sum(1 for line in f if line.strip())
        if labels and max(labels) >= nb_classes:
            raise ValueError(f'label {max(labels)} out of range for the {nb_classes} classes of {class_list}')
    else:
        nb_classes = max(labels, default=-1) + 1
    return ListDataset(parts['train' if is_train else 'val'], transform, skip_bad=skip_bad), nb_classes


def build_dataset(is_train, args):
    if args.data_set not in DATA_SETS:
        raise ValueError(f'unknown --data-set {args.data_set!r}; choose from {", ".join(DATA_SETS)}')
    transform = build_transform(is_train, args)
    if args.data_set in DIGITS_DOMAINS:
        return DigitsDataset(train=is_train, transform=transform, domain=DIGITS_DOMAINS[args.data_set]), 10

    root = args.data_path
    if not root:
        raise ValueError(f'--data-path is required for --data-set {args.data_set}')
    _require_dir(root, f'--data-path for --data-set {args.data_set} does not exist')
    if args.data_set in CIFAR_FILES:
        dataset = _cifar(args.data_set, root, is_train, transform)
        return dataset, len(dataset.classes)
    skip_bad = args.skip_bad_images
    if args.data_set in ('IMNET', 'FOLDER'):
        return _image_folder(root, is_train, transform, skip_bad)
    if args.data_set in ('INAT18', 'INAT19'):
        year = 2018 if args.data_set == 'INAT18' else 2019
        return _inat(root, year, args.inat_category, is_train, transform, skip_bad)
    return _ifood(root, is_train, transform, skip_bad)


def eval_crop_ratio(input_size: int, ratio=None) -> float:
    """--eval-crop-ratio, or its default: DeiT's 0.875 (224 of 256), 1 at CIFAR scale and below,
    where no margin is cropped away."""
    if ratio is not None:
        return ratio
    return 1.0 if input_size <= 32 else 224 / 256


def eval_preprocessing(input_size: int, data_set: str = None, crop_ratio=None) -> dict:
    """What the evaluation transform below does, in timm's pretrained_cfg terms."""
    return {'crop_pct': eval_crop_ratio(input_size, crop_ratio), 'interpolation': 'bicubic',
            'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
            'label_names': [str(i) for i in range(10)] if data_set in DIGITS_DOMAINS else None}


class RandomGaussianBlur:
    """PIL's Gaussian blur with a radius drawn uniformly from [low, high] for every image."""

    def __init__(self, low=0.1, high=2.0):
        self.low, self.high = low, high

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=np.random.uniform(self.low, self.high)))


def three_augment(args, hflip: float):
    """DeiT III's 3-Augment (--ThreeAugment): a crop (RandomResizedCrop, or with --src resize,
    reflect-pad 4 and crop) and a flip, then one of grayscale, solarization and Gaussian blur,
    then color jitter; no AutoAugment, no random erasing."""
    size = args.input_size
    if args.src:
        crop = [transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.RandomCrop(size, padding=4, padding_mode='reflect')]
    else:
        crop = [transforms.RandomResizedCrop(size, scale=(0.08, 1.0),
                                             interpolation=transforms.InterpolationMode.BICUBIC)]
    steps = crop + [transforms.RandomHorizontalFlip(hflip),
                    transforms.RandomChoice([transforms.Grayscale(3), ImageOps.solarize, RandomGaussianBlur()])]
    if args.color_jitter:
        steps.append(transforms.ColorJitter(args.color_jitter, args.color_jitter, args.color_jitter))
    return transforms.Compose(steps + [transforms.ToTensor(),
                                       transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


def build_transform(is_train, args):
    size = args.input_size
    small = size <= 32
    # A flipped digit is a different (or no) digit.
    hflip = 0.0 if args.data_set in DIGITS_DOMAINS else 0.5
    if is_train and getattr(args, 'ThreeAugment', False):
        return three_augment(args, hflip)
    if is_train:
        transform = create_transform(
            input_size=size,
            is_training=True,
            hflip=hflip,
            color_jitter=args.color_jitter,
            auto_augment=None if str(args.aa).lower() in ('', 'none') else args.aa,
            interpolation=args.train_interpolation,
            re_prob=args.reprob,
            re_mode=args.remode,
            re_count=args.recount,
        )
        if small:
            # DeiT's CIFAR recipe: pad-and-crop instead of RandomResizedCrop at low resolution.
            # The Resize is a no-op for CIFAR (already 32x32) and brings smaller images
            # (DIGITS is 8x8) up to size, which RandomCrop alone cannot do.
            transform.transforms[0] = transforms.Compose([
                transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                # pad with the background: the target digits are dark on white
                transforms.RandomCrop(size, padding=4, fill=255 if args.data_set == 'DIGITS_TARGET' else 0),
            ])
        return transform

    # DeiT: resize to size / --eval-crop-ratio (256 for 224 by default), center-crop size
    resize = int(size / eval_crop_ratio(size, getattr(args, 'eval_crop_ratio', None)))
    return transforms.Compose([
        transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


class ShardSampler(Sampler):
    """Every rank takes indices rank, rank + world, ...: no padding, so that metrics summed
    over ranks are exactly those of a single process (DistributedSampler repeats samples)."""

    def __init__(self, dataset, num_replicas, rank):
        self.indices = list(range(rank, len(dataset), num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)
