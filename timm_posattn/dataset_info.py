"""The table of datasets: every fact about a dataset that more than one part of the package needs, in one place.

Pure constants (no data loading, no PIL or numpy), so that the model file can read normalization constants from here
without importing any dataset code. Read by `data` (names, split aliases), `train.py` and `validate.py` (classes,
normalization and eval defaults), the model cards (titles, label names, Hub dataset ids) and `default_cfgs`.
"""
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

__all__ = ['DatasetInfo', 'DATASETS', 'get_dataset_info', 'STRUCTURED_MEAN', 'STRUCTURED_STD']

# The structured images store a patch value v as the pixel round(127.5 + 127.5·v/3): ToTensor + Normalize(0.5, 1/6)
# gives v back (timm_posattn.structured holds the encoding).
STRUCTURED_MEAN = (0.5, 0.5, 0.5)
STRUCTURED_STD = (1 / 6, 1 / 6, 1 / 6)

CIFAR10_LABELS = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
CIFAR100_LABELS = tuple(
    'apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can castle '
    'caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant '
    'flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man '
    'maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree '
    'plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper '
    'snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor '
    'train trout tulip turtle wardrobe whale willow_tree wolf woman worm'.split())

FASHION_MNIST_LABELS = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                        'Ankle boot')

_TRAIN = {'train': 'train', 'training': 'train'}
_EVAL = {name: 'validation' for name in ('val', 'valid', 'validation', 'eval', 'evaluation')}


@dataclass(frozen=True)
class DatasetInfo:
    """What the package knows about one dataset."""
    key: str  # short name: the pretrained tag and the model card's key
    title: str  # for people (model cards)
    names: Tuple[str, ...]  # what --dataset accepts for it (first: the canonical train.py name)
    num_classes: Optional[int]  # None: read from the data (image folders)
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    label_names: Optional[Tuple[str, ...]] = None  # None: from the data or unknown ('imagenet': timm's ImageNetInfo)
    hub_id: Optional[str] = None  # Hugging Face dataset id for card metadata
    splits: Mapping[str, str] = field(default_factory=dict)  # accepted split name -> the loader's split
    input_size: Tuple[int, int, int] = (3, 224, 224)
    crop_pct: float = 0.9
    interpolation: str = 'bicubic'
    synthetic: bool = False
    phrase: Optional[str] = None  # how a card's sentence names it (default: the title)
    install_hint: Optional[str] = None  # how to get the files onto a machine without a download (error messages)

    @property
    def dataset_name(self) -> str:
        """The canonical train.py / validate.py `--dataset` value."""
        return self.names[0]

    def split(self, name: str) -> Optional[str]:
        """The loader's split for an accepted split name (case and `[...]` slicing ignored); None if unknown."""
        return self.splits.get(name.split('[')[0].lower())


DATASETS: Dict[str, DatasetInfo] = {info.key: info for info in (
    DatasetInfo(
        key='structured', title='Synthetic spatially structured dataset (timm_posattn.structured)',
        names=('structured',), num_classes=2, mean=STRUCTURED_MEAN, std=STRUCTURED_STD, label_names=('-1', '+1'),
        splits={**_TRAIN, **_EVAL, 'test': 'test'}, input_size=(3, 32, 32), crop_pct=1.0, interpolation='nearest',
        synthetic=True, phrase="the paper's synthetic spatially structured dataset (`timm_posattn.structured`)"),
    DatasetInfo(
        key='cifar10', title='CIFAR-10', names=('torch/cifar10', 'cifar10'), num_classes=10,
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), label_names=CIFAR10_LABELS, hub_id='cifar10',
        input_size=(3, 32, 32), crop_pct=1.0),
    DatasetInfo(
        key='cifar100', title='CIFAR-100', names=('torch/cifar100', 'cifar100'), num_classes=100,
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), label_names=CIFAR100_LABELS, hub_id='cifar100',
        input_size=(3, 32, 32), crop_pct=1.0),
    DatasetInfo(
        key='svhn', title='SVHN', names=('torch/svhn', 'svhn'), num_classes=10,
        mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970), label_names=tuple(str(i) for i in range(10)),
        hub_id='svhn', splits={**_TRAIN, **{k: 'test' for k in _EVAL}, 'test': 'test', 'extra': 'extra'},
        input_size=(3, 32, 32), crop_pct=1.0, interpolation='bilinear'),
    DatasetInfo(  # 'validation' is the 10,000-image test set (the only held-out split; papers report it)
        key='fashion_mnist', title='Fashion-MNIST', names=('torch/fashion_mnist', 'fashion_mnist'), num_classes=10,
        mean=(0.2860,), std=(0.3530,), label_names=FASHION_MNIST_LABELS, hub_id='zalando-datasets/fashion_mnist',
        splits={**_TRAIN, **{k: 'test' for k in _EVAL}, 'test': 'test'}, input_size=(1, 28, 28), crop_pct=1.0,
        interpolation='bilinear',
        install_hint="'apt-get install dataset-fashion-mnist' puts them in /usr/share/datasets/fashion-mnist"),
    DatasetInfo(
        key='mnist', title='MNIST', names=('torch/mnist', 'mnist'), num_classes=10, mean=(0.1307,), std=(0.3081,),
        label_names=tuple(str(i) for i in range(10)), hub_id='ylecun/mnist',
        splits={**_TRAIN, **{k: 'test' for k in _EVAL}, 'test': 'test'}, input_size=(1, 28, 28), crop_pct=1.0,
        interpolation='bilinear'),
    DatasetInfo(
        key='imagenet', title='ImageNet-1k', names=('imagenet', 'imagenet1k', 'imagenet-1k', 'in1k'),
        num_classes=1000, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), label_names=None,
        hub_id='imagenet-1k'),
)}

_BY_NAME = {name: info for info in DATASETS.values() for name in (info.key, *info.names)}


def get_dataset_info(name: Optional[str]) -> Optional[DatasetInfo]:
    """The table entry for a `--dataset` value, a pretrained tag or a card key (case-insensitive); None if unknown."""
    if not name:
        return None
    name = name.lower()
    return _BY_NAME.get(name) or _BY_NAME.get(name.split('/')[-1])
