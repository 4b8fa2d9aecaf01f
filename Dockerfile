FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY domain ./domain
COPY messages ./messages
COPY infra ./infra
COPY service_layer ./service_layer
COPY workers ./workers
COPY api ./api
RUN pip install --no-cache-dir .
ENV PORT=8000
EXPOSE 8000
CMD ["credits", "web"]
