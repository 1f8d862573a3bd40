"""fedlora on Flower: a ServerApp and a ClientApp that run the engine's methods on ``flwr run`` simulations and on
real SuperLink/SuperNode deployments with the same math as ``fedlora run`` (needs ``pip install fedlora[flower]``).

    flwr run .                                  simulation (the federation in the Flower config)
    flwr run . my-deployment --stream           a SuperLink with one SuperNode per client

See ``deploy/flower/README.md``.
"""
