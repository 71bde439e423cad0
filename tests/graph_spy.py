"""A torch.compile backend that records the graphs it is given (test helper)."""

from __future__ import annotations


class GraphSpy:
    """A torch.compile backend recording the Dynamo graphs and the AOT forward/backward graphs: the
    ``call_function`` targets of each, as strings, in ``dynamo``, ``forward`` and ``backward``."""

    def __init__(self):
        self.dynamo, self.forward, self.backward = [], [], []

    @staticmethod
    def _targets(gm):
        return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]

    def __call__(self, gm, inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        self.dynamo.append(self._targets(gm))

        def fw(g, _):
            self.forward.append(self._targets(g))
            return make_boxed_func(g.forward)

        def bw(g, _):
            self.backward.append(self._targets(g))
            return make_boxed_func(g.forward)

        return aot_autograd(fw_compiler=fw, bw_compiler=bw)(gm, inputs)
