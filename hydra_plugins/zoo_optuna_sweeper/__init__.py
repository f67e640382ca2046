"""zoo's Optuna sweeper for Hydra (``hydra/sweeper=optuna``): current Optuna, one study shared by
any number of workers through an RDB storage. Kept out of ``zoo`` because Hydra discovers
plugins in the ``hydra_plugins`` namespace package only."""
