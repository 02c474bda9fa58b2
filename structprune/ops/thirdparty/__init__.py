"""Rules for layers and functions of third-party model zoos, registered without importing the zoo.

``timm`` and ``transformers`` rules name classes by their ``"module.QualName"`` string. torchvision's
rules are keyed by its function objects, so :mod:`.torchvision` is imported by the registry only once
torchvision itself is (``register_when_imported``): ``import structprune`` never imports a zoo.
"""
