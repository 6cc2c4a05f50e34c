"""PDF → document record, in plain functions (the ingest stage, tasks/ingest.py, wraps them in a Prefect task).

layout.py   lines with their style, running headers/footers, title, reading order
headings.py section headings: from the PDF outline when there is one, from the layout otherwise
cleanup.py  tables and captions as blocks, tables of contents and the reference list cut out
text.py     lines → heading/text blocks, words broken at line ends mended

Try one PDF:  python -m tasks.pdf.extract paper.pdf [--no-outline]
"""
