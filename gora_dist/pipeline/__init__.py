"""GoRA's pipeline over any engine: N gradient steps → importances → rank map → A0/B0 (a GoRAPlan),
then the adapters in the model. One code path for one process and for many."""
