"""Flower adapter: run fedrl-lightning's clients and server on Flower's Message API (``pip install -e .[flower]``).

- ``client_app``: the ClientApp (``@app.train``: one ``Client.run_round``; ``@app.evaluate``: held-out accuracy),
  client state on the client's disk (``state``).
- ``server_app``: the ServerApp (``@app.main``): our ``Server`` run by ``strategy.FedRLStrategy`` over the
  ``transport.FlowerTransport`` (messages to SuperNodes), the same round loop as ``fedrl fit``.
- ``settings``: how the Flower run config points at our YAML configs; ``records``: what crosses the wire.

A Flower app project whose components are these apps is ``examples/flower/`` (``flwr run examples/flower``).
Only this package imports ``flwr``; the core never depends on Flower.
"""

# Flower's simulation process imports the ServerApp and the ClientApp from two threads at once, and concurrent first
# imports of modules that import each other fail ("partially initialized module"). Both apps pass through this
# package first, so importing the project here runs those imports once, under this package's import lock.
import fedrl_lightning.cli  # noqa: F401
