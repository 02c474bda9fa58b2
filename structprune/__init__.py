"""structprune: structured pruning of PyTorch models with one call.

```python
import structprune as sp
small = sp.slim(model, example_input, ratio=0.5)
```

The public API, by the question each part answers: what is coupled (:class:`DependencyGraph`),
how to extend what is understood (:func:`rule`, :func:`updater`, :func:`register_size_attribute`),
how important (:func:`register_criterion`, :func:`list_criteria`), how much and where (the options),
when (:class:`Pruner`, :class:`SoftPruner`, :class:`LotteryTicket`, :func:`regularizer`), at which
granularity (:func:`sparsify` and the masks), and around the engine (save/load, reports, metrics).
"""
import lazy_loader

# The public names and the modules they live in are the imports of __init__.pyi. Importing them here
# would load torch and every subsystem (over 2 s on a small machine) before a user asks for anything:
# ``import structprune`` and ``structprune --help`` stay instant, ``sp.slim`` imports what it needs on
# first use. EAGER_IMPORT=1 in the environment imports everything at once (lazy_loader's switch).
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)

__version__ = "0.1.0"
