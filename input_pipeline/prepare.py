"""Prepares a data set's ArrayRecord files from the official downloads (no tensorflow).

  python -m input_pipeline.prepare --dataset ade20k --manual_dir ~/downloads \
      --data_dir ~/tensorflow_datasets [--skip_bad]

Every example is validated (image decodes, label present and the same size,
label values mapped into [0, K) or 255). By default any bad example stops the
run with exit status 2 and a report naming every bad file and why; with
--skip_bad the good ones are written. Safe to re-run: a prepared data set is
left as it is, an interrupted one is rebuilt from scratch. Ends with one line
per split: `split=<name> examples=<n> skipped=<m>`.
"""
from __future__ import annotations

import argparse
import logging
import pathlib
import sys

import tensorflow_datasets as tfds

from input_pipeline import builders
from semask_jax import cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m input_pipeline.prepare', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--dataset', required=True, choices=sorted(builders.BUILDERS))
  p.add_argument('--manual_dir', required=True, help='folder with the official zips or their extracted folders')
  p.add_argument('--data_dir', required=True, help='TFDS data_dir to write to')
  p.add_argument('--skip_bad', action='store_true', help='skip bad examples instead of failing')
  return p.parse_args(argv)


def prepare(dataset: str, manual_dir: str, data_dir: str, skip_bad: bool = False
            ) -> list[tuple[str, int, int]]:
  """Builds (or finds) the data set; returns (split, examples, skipped) rows."""
  builder = builders.get_builder(dataset, data_dir, skip_bad=skip_bad)
  manual = pathlib.Path(manual_dir)
  if not builder.is_prepared() and (not manual.is_dir() or not any(manual.iterdir())):
    raise cli.PathNotFoundError(f'manual_dir {manual_dir} is missing or empty.\n'
                                f'{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}')
  builder.download_and_prepare(
      file_format='array_record',
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  skipped = builders.skipped_counts(builder)
  return [(name, split.num_examples, skipped.get(name, 0))
          for name, split in builder.info.splits.items()]


class _NotPreparedYetFilter(logging.Filter):
  """Drops TFDS's warning that a data set has no dataset_info.json: the normal case here."""

  def filter(self, record: logging.LogRecord) -> bool:
    return 'has no dataset_info.json' not in record.getMessage()


_NOT_PREPARED_YET = _NotPreparedYetFilter()


def main(argv: list[str] | None = None) -> int:
  """0, or 2 after an `error:` line on stderr (a missing download, bad examples)."""
  args = parse_args(argv)
  logging.getLogger('absl').addFilter(_NOT_PREPARED_YET)  # once
  try:
    rows = prepare(args.dataset, args.manual_dir, args.data_dir, args.skip_bad)
  except builders.BadExamplesError as e:  # the error line, then one line per bad file
    return cli.report(f'prepare {args.dataset}: nothing written; {e}', details=True)
  except cli.PathNotFoundError as e:
    return cli.report(f'prepare {args.dataset}: {e}')
  if args.skip_bad:
    builder = builders.get_builder(args.dataset, args.data_dir)
    for split, bad in (builder.info.metadata.get('skipped') or {}).items():
      for file_name, why in bad:
        print(f'skipped [{split}] {file_name}: {why}', file=sys.stderr)
  for name, n, m in rows:
    print(f'split={name} examples={n} skipped={m}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
