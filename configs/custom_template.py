"""MCIBI on your own dataset: the released ADE20k recipe with ``dataset.name = "custom"``.

Lay the dataset out as docs/custom_datasets.md describes (``dataset.json``, ``images/``,
``masks/``, ``splits/<split>.txt``), check it, then train::

    python -m mcibi_jax.data.inspect --config=configs/custom_template.py:r50 \\
        --config.dataset.root=/data/my_set --split=train
    python -m mcibi_jax.main --config=configs/custom_template.py:r50 \\
        --config.dataset.root=/data/my_set --workdir=/tmp/my_run

Args (``configs/custom_template.py:<arg>``): ``r50``, ``r101``, ``s101``, ``hrnet48``, ``vitl``
(the backbones of the ADE20k recipes). The backbone starts from a random initialisation;
``--config.train.init_from=...`` loads a checkpoint with the same number of classes.

``dataset.num_classes`` and ``model.num_classes`` (one shared value) and
``dataset.train.flip_label_pairs`` are read from ``<dataset.root>/dataset.json`` whenever they
are used, so they follow a ``--config.dataset.root`` given on the command line; without a
dataset.json there, using them stops the run with an error naming the missing file. Setting
``--config.dataset.num_classes=N`` fixes the value (it must then match dataset.json).

Commonly changed (all overridable with ``--config.<key>=<value>``):

    dataset.root                   "data/custom"
    dataset.train_set / eval_set   "train" / "val"      (splits/<name>.txt)
    dataset.train.crop_size        (512, 512)           (also the padded batch size, dataset.train.pad_size)
    dataset.train.output_size      (2048, 512)          (random-scale base: long / short side bounds)
    dataset.train.scale_range      (0.5, 2.0)
    dataset.test.output_size       (2048, 512)
    train.batch_size, train.num_epochs, train.optimizer.lr, train.init_from
    model.head.use_memory_loss     True                 (as in the ADE20k recipe)
"""

import ml_collections

from mcibi_jax.configs import ade20k
from mcibi_jax.data.datasets.custom import root_fields

DEFAULT_ROOT = "data/custom"
BACKBONES = ade20k.BACKBONES


def get_config(arg: str = "r50") -> ml_collections.ConfigDict:
    if arg not in BACKBONES:
        raise ValueError(
            f"configs/custom_template.py:{arg}: choose a backbone from {', '.join(BACKBONES)}"
        )
    config = ade20k.get_config(arg)
    fields = root_fields(DEFAULT_ROOT)
    crop = ml_collections.FieldReference((512, 512), field_type=tuple)

    config.name = f"mcibi_{arg}_custom"
    config.model.num_classes = fields["num_classes"]
    dataset = config.dataset
    dataset.name = "custom"
    dataset.root = fields["root"]
    dataset.num_classes = fields["num_classes"]  # the same reference as model.num_classes
    dataset.train_set = "train"
    dataset.eval_set = "val"
    dataset.train.crop_size = crop
    dataset.train.pad_size = crop  # the same reference: batches are crop-sized
    dataset.train.flip_label_pairs = fields["flip_label_pairs"]
    # Own data reproduces no published run: one loss mean and one memory update per global batch,
    # so any batch size works.
    config.train.num_replicas = 1
    return config
