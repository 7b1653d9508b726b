"""Prepare a TFDS data set that jaxjob ships a builder for, into a data_dir (local or gs://).

    python -m trainer.data.prepare_tfds --name=mobile_price \
        --manual_dir=../shared/data/mobile-price --data_dir=gs://BUCKET/tfds

Writes ArrayRecord files that `--config.data.source=tfds --config.data.name=mobile_price
--config.data.data_dir=...` reads without TensorFlow.
"""

import sys

from absl import app
from absl import flags

_NAME = flags.DEFINE_enum("name", "mobile_price", ["mobile_price"], "Builder to prepare.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Directory holding the source files.",
                                  required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir (local or gs://).",
                                required=True)


def prepare(name: str, manual_dir: str, data_dir: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from trainer.data.tfds_builders import mobile_price  # pylint: disable=g-import-not-at-top
  builders = {"mobile_price": mobile_price.MobilePrice}
  builder = builders[name](data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def main(argv):
  del argv
  builder = prepare(_NAME.value, _MANUAL_DIR.value, _DATA_DIR.value)
  print(f"prepared {builder.info.name} {dict(builder.info.splits)} in {builder.data_dir}",
        file=sys.stdout)


if __name__ == "__main__":
  app.run(main)
