"""One module per architecture; `model.arch` in params.yaml names one (see ctclab.models).

Add your own by dropping a module here: an ArchConfig subclass with its knobs and defaults, and a
CTCModel subclass decorated with `@register("<name>", <Config>)`. It is found on the next run
(nothing else to edit), trained with `dvc exp run -S model.arch=<name>`, and its knobs are set in
params.yaml under `model.<name>` (keys left out take the config's defaults). The whole folder is a
dependency of the train, evaluate and submit stages in dvc.yaml.
"""
