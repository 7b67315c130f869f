"""monai_dp: differentially private training for MONAI.

Glossary (the words used in code, errors and docs; see docs/architecture.md):

- **record**: one entry of a datalist, a dict such as ``{"image": ..., "label": ..., "patient_id": ...}``.
- **patient**: all records that share one value of ``patient_key`` (default ``"patient_id"``).
- **unit** (``privacy_unit``): what the guarantee protects and what Poisson sampling draws: a record
  (``"record"``) or a patient (``"patient"``). N (``num_units``) counts units and every unit enters a step
  independently with probability ``sample_rate`` (q). "Sampled unit" is the term; nothing else is sampled.
- **item**: a unit as it arrives in one batch (one index of the dataset the Poisson loader draws from; for a
  patient, all of its records). ``num_items`` is the number of units sampled in a step.
- **row**: one entry along a collated tensor's batch dimension. One item gives one or more rows (multi-crop
  transforms, several records of a patient).
- **group**: the rows of one item; ``dp_group`` maps every row to its item's index. A group is clipped as one
  (its rows' gradients are summed, then clipped), so one unit never contributes more than ``max_grad_norm``.
- **step**: one noisy optimizer step on one Poisson batch (possibly several physical batches of at most
  ``max_physical_batch_size`` items); the accountant counts steps.
- **dataset id**: the name the ledger charges; by default the fingerprint of the training records
  (:func:`monai_dp.privacy.fingerprint.dataset_fingerprint_of_records`).
"""

__version__ = "0.1.0"

from monai_dp.utils.logs import guard_opacus_logging as _guard_opacus_logging

_guard_opacus_logging()  # Opacus' import configures the root logger; undo it so the user's basicConfig works
