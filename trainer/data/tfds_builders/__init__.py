"""TFDS builders for data jaxjob ships recipes for (prepared with `trainer.data.prepare_tfds`)."""
