"""An example jaxjob project: everything here lives outside the trainer's package.

`model.py` (an NNX module with BatchNorm and Dropout), `data.py` (a random-access data
source), `task.py` (classification plus a metric of its own) and `configs/digits.py`
(the config that names them). See docs/your-own-model.md.
"""
