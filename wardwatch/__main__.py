from wardwatch.cli import app

app()
