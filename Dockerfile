# voltpool controller and simulators: one image, the command chooses the role.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY controller ./controller
COPY adapters ./adapters
COPY simulators ./simulators
COPY data ./data
RUN pip install --no-cache-dir . && useradd --create-home voltpool
USER voltpool
ENV VOLTPOOL_DATA_DIR=/home/voltpool/var
EXPOSE 9000
ENTRYPOINT ["voltpool"]
CMD ["run"]
