"""Ray Serve HTTP endpoint and batch prediction of the champion model (see ``app.py``, ``predictor.py``)."""
