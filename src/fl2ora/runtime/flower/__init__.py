"""fl2ora on Flower: ClientApp, ServerApp, strategies and a local deployment launcher.

Needs the ``flower`` extra (``pip install 'fl2ora[flower]'``). The modules import
Flower at the top, so import them only where Flower is installed:

- :mod:`~fl2ora.runtime.flower.client_app`: the ClientApp (``app``), one node = one partition.
- :mod:`~fl2ora.runtime.flower.server_app`: the ServerApp (``app``) and :func:`run_federation`.
- :mod:`~fl2ora.runtime.flower.strategies`: FedAvg, FedProx, FedDyn and FedNova on Flower's
  strategy classes, sampling clients by partition id.
- :mod:`~fl2ora.runtime.flower.messages`: what travels in a message, and reply validation.
- :mod:`~fl2ora.runtime.flower.nodes`: which Flower node serves which partition.
- :mod:`~fl2ora.runtime.flower.inprocess`: a Grid that calls the ClientApp in this process.
- :mod:`~fl2ora.runtime.flower.deploy`: SuperLink and SuperNodes on 127.0.0.1 with TLS.
"""
