from services.common.service import main
from services.search.service import SearchService

raise SystemExit(main(SearchService))
