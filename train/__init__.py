"""`python -m train --config configs/<name>.py`: thin entry point over `jaxedit.train.loop`."""
